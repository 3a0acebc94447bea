"""Tracing a denoiser to ONNX: the graphs' input and output names, the traced batch and example
inputs, torch.onnx.export with dynamic shapes and its one-line failures, and the fused step graph
composed from a traced denoiser (compose_step). onnx_export.py writes export directories with these;
step caching's split graphs (cache_export.py) use them too."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vdit_deploy.validate import INT32_MAX
from vdit_deploy.contract import BATCH, Contract, timestep_doc
from vdit_deploy.samplers import COEF_NAMES
from vdit_deploy.errors import VditError, first_line
from vdit_deploy.export.metadata import NULL_PREFIX, STEP_STATE
from vdit_deploy.export.rewrites import rewrite_bool_where
from vdit_deploy.export.step_module import GuidedUpdate
from vdit_deploy.export.variants import STEP
from vdit_deploy.files import check_output, temp_dir

OPSET = 18                     # LayerNormalization needs 17; 18 is the dynamo exporter's native opset
MAX_OPSET = 23                 # the newest torch.onnx writes (torch.onnx._constants.ONNX_MAX_OPSET)
DEFAULT_BATCH = (1, 8)         # videos per call; denoiser.onnx also takes 2x that (cond + null)
PROTOBUF_LIMIT = 2 ** 31       # a single ONNX file cannot exceed 2 GB: larger models keep weights beside it

STEP_TAIL = ("guidance", "coefs", "noise", *(i for i, _ in STEP_STATE))
STEP_OUTPUTS = ("x_prev", *(o for _, o in STEP_STATE))


def denoiser_inputs(contract: Contract) -> tuple:
    return ("x_t", "t", *contract.names)


def step_inputs(contract: Contract) -> tuple:
    return ("x_t", "t", *contract.names, *(NULL_PREFIX + n for n in contract.names), *STEP_TAIL)


def _weights_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _dynamic_shapes(module: nn.Module, axes: list, ranges: dict):
    """Per input, its named axes ("batch", "seq", ... or None for fixed) -> torch.export dynamic shapes,
    grouped as forward's signature takes them (a *args parameter is one tuple); an axis whose range is
    one value stays static. None when nothing is dynamic."""
    import inspect

    dims = {name: torch.export.Dim(name, min=lo, max=hi) for name, (lo, hi) in ranges.items() if lo < hi}
    shapes = tuple({i: dims[a] for i, a in enumerate(names) if a in dims} or None for names in axes)
    if not any(shapes):
        return None
    params = list(inspect.signature(module.forward).parameters.values())
    star = next((i for i, p in enumerate(params) if p.kind is p.VAR_POSITIONAL), None)
    return shapes if star is None else (*shapes[:star], shapes[star:])


def _export(module: nn.Module, example_inputs: tuple, path: Path, input_names, output_names,
            axes: list, ranges: dict, opset: int,
            metadata: dict[str, str] | None, external_data: bool | None) -> Path:
    """Export with dynamo, stamp metadata, save (external data over 2 GB), then check the saved file.
    axes: each input's axis names (None for fixed axes); ranges: axis name -> (min, max)."""
    module = module.eval()
    if external_data is None:
        external_data = _weights_bytes(module) > PROTOBUF_LIMIT * 0.9   # leave room for the graph
    program = _trace(module, example_inputs, input_names, output_names, _dynamic_shapes(module, axes, ranges), opset)
    for value, names in zip(program.model.graph.inputs, axes):   # the exporter may fall back to static shapes
        for i, name in enumerate(names):                           # with only a warning
            lo, hi = ranges.get(name, (1, 1))
            if lo < hi and isinstance(value.shape[i], int):            # onnx_ir: int (static) or SymbolicDim
                raise ExportFailed(f"ONNX export of {type(module).__name__}: axis {name} of {value.name} came out "
                                f"static ({value.shape[i]}); the model's forward must not depend on it")
    rewrite_bool_where(program.model)                              # ONNX Runtime has no bool Where kernel
    program.model.metadata_props.update(metadata or {})
    program.model.producer_name = "vdit-deploy"
    program.save(str(path), external_data=external_data)
    return _check_saved(path)


def _trace(module: nn.Module, example_inputs: tuple, input_names, output_names, dynamic_shapes, opset: int):
    """torch.onnx's dynamo export -> its ONNXProgram, quietly; failures as one VditError line."""
    try:
        # the exporter prints progress to stdout and warns about ops it skips: keep the CLI quiet
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            for name in ("torch.onnx", "onnxscript"):     # the optimizer logs what it does not fold
                logging.getLogger(name).setLevel(logging.ERROR)
            return torch.onnx.export(
                module, tuple(example_inputs), dynamo=True, opset_version=opset, optimize=True,
                input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=dynamic_shapes, verbose=False, report=False)
    except Exception as e:   # torch.export raises many types; keep the user-facing error one line
        # its own error says only "Failed to export ... step 1/3": the cause is at the chain's end
        raise ExportFailed(f"ONNX export of {type(module).__name__} failed: {first_line(e)}") from None


class ExportFailed(VditError):
    """Tracing or exporting failed (a fixed batch may still work: export_source falls back)."""


def _check_saved(path: Path) -> Path:
    """full_check runs strict shape inference too; checking the path works for > 2 GB models."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise VditError(f"{path.name} fails the ONNX checker: {str(e).splitlines()[0]}") from None
    return path


def compose_step(denoiser_path: Path, path: Path, contract: Contract, batch: tuple[int, int], opset: int,
                 metadata: dict[str, str], external_data: bool) -> Path:
    """step.onnx from a denoiser graph that takes the 2B rows (denoiser.onnx, or for a fixed batch N one
    traced at 2N), with no trace of the whole step: Concat nodes make the 2B batch
    (x_t twice, t twice, each conditioning input with its null_<name>), the denoiser graph runs it, and
    GuidedUpdate (traced alone: no weights) guides and updates. Tracing FusedStep whole makes
    torch.export's symbolic shapes grow with the depth through the 2B batch (a 12-layer Latte: 440 s
    against 34 s for its denoiser; 28 layers did not finish in 25 min); composing takes seconds.
    The denoiser's weights are moved, not copied, into the step graph."""
    import onnx
    from onnx import helper

    lo, hi = batch
    n = traced_size(lo, hi, fixed_sizes(contract)) if lo < hi else lo   # the batch traced
    video = lambda: torch.zeros(n, *contract.latent)           # distinct tensors: export ties aliased inputs
    example = (video(), torch.zeros(2 * n, contract.out_channels, *contract.latent[1:]), torch.tensor([2.0]),
               torch.linspace(0.1, 1.5, len(COEF_NAMES)), video(), video(), video())
    dim = torch.export.Dim("batch", min=lo, max=hi) if lo < hi else None
    shapes = None if dim is None else ({0: dim}, {0: 2 * dim}, None, None, {0: dim}, {0: dim}, {0: dim})
    update = _trace(GuidedUpdate(), example, ("x_t", "out", *STEP_TAIL), STEP_OUTPUTS, shapes, opset).model_proto
    # the update's inner edges get a prefix, its I/O keep their names; an explicit map: onnx 1.17 and 1.18 rename
    # every node edge, the graph's inputs and outputs too, whatever rename_inputs / rename_outputs say
    io = {v.name for v in (*update.graph.input, *update.graph.output)}
    edges = {e: "update/" + e for n in update.graph.node for e in (*n.input, *n.output) if e and e not in io}
    onnx.compose.add_prefix_graph(update.graph, "update/", rename_edges=False, rename_inputs=False,
                                  rename_outputs=False, inplace=True, name_map=edges)

    model = onnx.load(str(denoiser_path))                       # weights and all
    g = model.graph
    inputs = {i.name: i for i in g.input}
    names = denoiser_inputs(contract)                           # x_t, t, *cond: the 2B rows
    doubled = {n: f"{n}_2b" for n in names}
    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise VditError(f"{denoiser_path.name} has control flow ({node.op_type}): its step graph cannot be composed")
        node.input[:] = [doubled.get(i, i) for i in node.input]
    concat = [helper.make_node("Concat", [n, NULL_PREFIX + n if n in contract.names else n], [doubled[n]],
                               name=f"step/concat_{n}", axis=0) for n in names]
    nodes = [*concat, *g.node, *update.graph.node]             # in topological order
    del g.node[:]
    g.node.extend(nodes)
    specs = {i.name: i for i in update.graph.input}             # x_t and the tail, batch B
    for name in names[1:]:                                      # t and the conditioning: the denoiser's specs
        for spec_name in (name, NULL_PREFIX + name) if name in contract.names else (name,):
            spec = specs[spec_name] = onnx.ValueInfoProto()
            spec.CopyFrom(inputs[name])
            spec.name = spec_name
            first = spec.type.tensor_type.shape.dim[0]          # the denoiser's 2B rows -> the step's B
            if dim is None:
                first.dim_value = lo
            else:
                first.dim_param = "batch"
    del g.input[:]
    g.input.extend(specs[name] for name in step_inputs(contract))
    del g.output[:]
    g.output.extend(update.graph.output)
    del g.value_info[:]                                         # the denoiser's are of its 2B batch
    g.initializer.extend(update.graph.initializer)
    model.functions.extend(update.functions)
    del model.metadata_props[:]
    model.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in metadata.items())
    onnx.save_model(model, str(path), save_as_external_data=external_data, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return _check_saved(path)


def export_denoiser(module: nn.Module, example_inputs: tuple, out_path: str | Path,
                    input_names: tuple = ("x_t", "t", "y"), batch: tuple[int, int] | None = DEFAULT_BATCH,
                    fixed_batch: int | None = None, opset: int = OPSET, metadata: dict[str, str] | None = None,
                    external_data: bool | None = None) -> Path:
    """Export any `module(x_t, t, *cond) -> out` to one .onnx file with a dynamic batch (no vdit metadata
    unless given; export_source writes a whole export directory).

    example_inputs: tensors named by input_names; their batch size must lie in `batch` (min, max), the
    dynamic batch range, or equal `fixed_batch` for a fixed-shape export (edge builds). external_data:
    keep weights in `<name>.data` beside the file (None: only when they exceed 2 GB). Written atomically."""
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise VditError(f"{out_path}: the output file must end in .onnx")
    if len(example_inputs) != len(input_names):
        raise VditError(f"example_inputs must be {', '.join(input_names)}: got {len(example_inputs)} tensors")
    batch = _check_batch(batch, fixed_batch, example_inputs[0].shape[0])
    check_output(out_path)
    with temp_dir(out_path) as tmp:   # same filesystem: the renames below are atomic
        _export(module, example_inputs, tmp / out_path.name, input_names, ("out",),
                [[BATCH] + [None] * (x.dim() - 1) for x in example_inputs], {BATCH: batch or (1, 1)}, opset,
                metadata, external_data)
        for file in tmp.iterdir():   # the .onnx last: a reader never sees it without its .data
            if file.suffix != ".onnx":
                os.replace(file, out_path.parent / file.name)
        os.replace(tmp / out_path.name, out_path)
    return out_path


def _check_batch(batch, fixed_batch, example_batch):
    check_options(batch, fixed_batch, OPSET)
    if fixed_batch is not None:
        if example_batch != fixed_batch:
            raise VditError(f"example inputs have batch {example_batch}, the fixed batch is {fixed_batch}")
        return None
    if not batch[0] <= example_batch <= batch[1]:
        raise VditError(f"example inputs have batch {example_batch}, outside the batch range {batch[0]}:{batch[1]}")
    return tuple(batch)


# ---- a model -> export directory ------------------------------------------------------------------
def _io(contract: Contract, kind: str, batch_name: str) -> dict:
    video = [batch_name, *contract.latent]
    spec = lambda name, shape, dtype, layout: {"name": name, "shape": shape, "dtype": dtype, "layout": layout}
    cond = [spec(c.name, [batch_name, *c.shape[1:]], c.dtype, c.doc or "conditioning") for c in contract.cond]
    inputs = [spec("x_t", video, "float32", "NCFHW noisy video latents"),
              spec("t", [batch_name], "float32", timestep_doc(contract.schedule)),
              *cond]
    if kind == STEP:
        inputs += [{**c, "name": NULL_PREFIX + c["name"], "layout": "null conditioning (null_cond.safetensors, "
                                                                     "repeated over the batch)"} for c in cond]
        inputs += [spec("guidance", [1], "float32", "classifier-free guidance scale"),
                   spec("coefs", [len(COEF_NAMES)], "float32", " ".join(COEF_NAMES)),
                   spec("noise", video, "float32", "N(0, I) for a stochastic step, else zeros"),
                   spec("x0_prev", video, "float32", "the previous step's x0 output (zeros at the first step)"),
                   spec("corr", video, "float32", "the previous step's corr_next output (zeros at the first step)")]
        outputs = [spec("x_prev", video, "float32", "NCFHW video at the next (earlier) timestep"),
                   spec("x0", video, "float32", "this step's clipped data prediction (the next x0_prev)"),
                   spec("corr_next", video, "float32", "UniPC's corrector part for the next step (the next corr)")]
    else:
        out = [batch_name, contract.out_channels, *contract.latent[1:]]
        outputs = [spec("out", out, "float32", f"NCFHW model output: {contract.output}")]
    return {"inputs": inputs, "outputs": outputs}


def versions() -> dict:
    import onnx
    import onnxscript

    import vdit_deploy
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "vdit-deploy": vdit_deploy.__version__, "exporter": "torch.onnx dynamo"}


def fixed_sizes(contract: Contract) -> set:
    """The sizes of the graphs' fixed axes: a traced dynamic size must differ from each (traced_size)."""
    return {*contract.latent, contract.out_channels, *(d for c in contract.cond for d in c.shape if isinstance(d, int))}


def traced_size(lo: int, hi: int, taken) -> int:
    """A size in lo..hi (at least 2: torch.export specialises 0 and 1) that no fixed axis has: torch.export
    ties equal sizes together (a batch of 2 traced with 2 frames comes out a static 2)."""
    free = (n for n in range(max(lo, 2), hi + 1) if n not in taken)      # lazily: hi may be 10^11
    return next(free, max(lo, min(hi, 2)))


def example_inputs(contract: Contract, batch: int, seed: int = 0) -> tuple:
    """Traced inputs: random video, mid-schedule t, random conditioning; named axes at a size inside
    their range that no other axis has (torch.export would tie equal sizes together)."""
    rng = np.random.default_rng(seed)
    taken = {*fixed_sizes(contract), batch, 2 * batch}
    sizes = {}
    for name, (lo, hi) in contract.axes.items():
        sizes[name] = traced_size(max(lo, 7) if hi >= 7 else lo, hi, taken)
        taken.add(sizes[name])
    cond = contract.example_cond(batch, rng, sizes)
    x = torch.from_numpy(rng.standard_normal((batch, *contract.latent), dtype=np.float32))
    t = torch.full((batch,), contract.schedule.num_timesteps / 2)
    return (x, t, *(torch.from_numpy(cond[name]) for name in contract.names))


def check_options(batch, fixed, opset) -> None:
    """The export options, before the work: opset, batch range or fixed batch."""
    if not isinstance(opset, int) or not 17 <= opset <= MAX_OPSET:
        raise VditError(f"opset must be 17 (LayerNormalization) .. {MAX_OPSET}, got {opset}")
    if fixed is not None:
        if not 1 <= fixed <= INT32_MAX:
            raise VditError(f"fixed batch must be 1..{INT32_MAX}, got {fixed}")
        return
    lo, hi = batch
    if not 1 <= lo <= hi <= INT32_MAX:
        raise VditError(f"batch range must be 1 <= MIN <= MAX <= {INT32_MAX}, got {lo}:{hi}")
    if hi < 2:   # torch.export specialises a dimension whose only value is 1
        raise VditError(f"a dynamic batch range needs MAX >= 2 (got {lo}:{hi}); use a fixed batch of 1 instead")
