"""Checkpoint -> ONNX: the denoiser graph and the fused sampler-step graph, with vdit metadata.

    denoiser.onnx  (x_t (B,C,F,H,W) f32, t (B,) f32, y (B,) i32) -> eps (B,C,F,H,W) f32
    step.onnx      (x_t, t, y, guidance (1,) f32, coefs (13,) f32, noise, x0_prev, corr) -> x_prev, x0, corr_next
                   classifier-free guidance (cond + null label as one 2B batch) and the affine update of
                   diffusion.apply_step inside the graph, with the multistep solvers' state (previous x0,
                   UniPC's corrector part; all (B,C,F,H,W) f32) in and out: a GPU runtime keeps the video
                   and the state on the device for the whole loop, the host only feeds scalars and noise.

Exporter: torch.onnx's dynamo exporter (torch.export + onnxscript + its graph optimizer). On the tiny
preset it gives 420 nodes against TorchScript's 1466: TorchScript traces every `x.shape[i]` into
Shape/Gather/Unsqueeze/Concat chains (101 Shape, 187 Unsqueeze, 505 Constant, 35 Cast, int64
arithmetic between the layers), while dynamo keeps symbolic shapes in torch.export and folds them
into 8 Shape ops, LayerNormalization and plain MatMul/Softmax attention, with no Sequence ops. Fewer
int64 shape subgraphs is what TensorRT's parser and its dynamic-shape profiles want.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from vdit_deploy.checkpoint import load_model, read_info
from vdit_deploy.config import check_memory
from vdit_deploy.diffusion import COEF_NAMES
from vdit_deploy.errors import VditError
from vdit_deploy.export.metadata import STEP_STATE, ExportMetadata
from vdit_deploy.export.variants import DENOISER, STEP, variant_file
from vdit_deploy.files import atomic_path, check_output, temp_dir

OPSET = 18                     # LayerNormalization needs 17; 18 is the dynamo exporter's native opset
DEFAULT_BATCH = (1, 8)         # videos per call; denoiser.onnx also takes 2x that (cond + null)
PROTOBUF_LIMIT = 2 ** 31       # a single ONNX file cannot exceed 2 GB: larger models keep weights beside it

DENOISER_INPUTS, DENOISER_OUTPUTS = ("x_t", "t", "y"), ("eps",)
STEP_INPUTS = ("x_t", "t", "y", "guidance", "coefs", "noise", *(i for i, _ in STEP_STATE))
STEP_OUTPUTS = ("x_prev", *(o for _, o in STEP_STATE))


# ---- the graphs ------------------------------------------------------------------------------
def apply_step(x_t, eps, coefs, noise, x0_prev, corr) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """diffusion.apply_step in torch, op for op (tests compare the graph with the numpy version)."""
    a, b, clip, c_x0, c_xt, c_eps, sigma, c_x0_prev, c_corr, d_x0, d_xt, d_x0_prev, d_corr = coefs.unbind(0)
    eps = eps[:, :x_t.shape[1]]                                                  # learned sigma: eps/v first
    ax = a * x_t
    x0 = torch.minimum(torch.maximum(ax - b * eps, -clip), clip)                 # Min/Max: no Clip-with-inputs
    eps_hat = (ax - x0) / b
    x_prev = c_x0 * x0 + c_xt * x_t + c_eps * eps_hat
    x_prev = x_prev + c_x0_prev * x0_prev + c_corr * corr
    corr_next = d_x0 * x0 + d_xt * x_t + d_x0_prev * x0_prev + d_corr * corr
    return x_prev + sigma * noise, x0, corr_next                                 # sigma = 0: noise is zeros


class FusedStep(nn.Module):
    """One guided sampler step: (x_t, t, y, guidance, coefs, noise, x0_prev, corr) -> (x_prev, x0, corr_next)."""

    def __init__(self, denoiser: nn.Module, null_label: int):
        super().__init__()
        self.denoiser, self.null_label = denoiser, null_label

    def forward(self, x_t, t, y, guidance, coefs, noise, x0_prev, corr):
        both = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]),
                             torch.cat([y, torch.full_like(y, self.null_label)]))   # (2B, C, F, H, W)
        b = x_t.shape[0]
        eps_cond, eps_null = both[:b], both[b:]        # slices, not chunk(2): chunk's ceil-div guard pins B
        eps = eps_null + guidance * (eps_cond - eps_null)                          # guidance (1,)
        return apply_step(x_t, eps, coefs, noise, x0_prev, corr)


def _weights_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _dynamic_shapes(n_inputs: int, batched: tuple[bool, ...], batch: tuple[int, int] | None):
    if batch is None:
        return None
    dim = torch.export.Dim("batch", min=batch[0], max=batch[1])
    return tuple({0: dim} if b else None for b in batched[:n_inputs])


def _export(module: nn.Module, example_inputs: tuple, path: Path, input_names, output_names,
            batched: tuple[bool, ...], batch: tuple[int, int] | None, opset: int,
            metadata: dict[str, str] | None, external_data: bool | None) -> Path:
    """Export with dynamo, stamp metadata, save (external data over 2 GB), then check the saved file."""
    import onnx

    module = module.eval()
    if external_data is None:
        external_data = _weights_bytes(module) > PROTOBUF_LIMIT * 0.9   # leave room for the graph
    try:
        # the exporter prints progress to stdout and warns about ops it skips: keep the CLI quiet
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                module, tuple(example_inputs), dynamo=True, opset_version=opset, optimize=True,
                input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=_dynamic_shapes(len(example_inputs), batched, batch),
                verbose=False, report=False)
    except Exception as e:   # torch.export raises many types; keep the user-facing error one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise VditError(f"ONNX export of {type(module).__name__} failed: {type(e).__name__}: {first}") from None
    if batch is not None:   # the exporter may fall back to static shapes with only a warning
        dim = program.model.graph.inputs[0].shape[0]          # onnx_ir: int (static) or SymbolicDim
        if isinstance(dim, int):
            raise VditError(f"ONNX export of {type(module).__name__}: the batch axis came out static ({dim}); "
                            "the model's forward must not depend on the batch size")
    program.model.metadata_props.update(metadata or {})
    program.model.producer_name = "vdit-deploy"
    program.save(str(path), external_data=external_data)
    # full_check runs strict shape inference too; checking the path works for > 2 GB models.
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise VditError(f"{path.name} fails the ONNX checker: {str(e).splitlines()[0]}") from None
    return path


def export_denoiser(module: nn.Module, example_inputs: tuple, out_path: str | Path,
                    batch: tuple[int, int] | None = DEFAULT_BATCH, fixed_batch: int | None = None,
                    opset: int = OPSET, metadata: dict[str, str] | None = None,
                    external_data: bool | None = None) -> Path:
    """Export any `module(x_t, t, y) -> eps` to one .onnx file (inputs x_t, t, y; output eps).

    example_inputs: (x_t, t, y) tensors; their batch size must lie in `batch` (min, max), the dynamic
    batch range, or equal `fixed_batch` for a fixed-shape export (edge builds). metadata: extra
    metadata_props (vdit exports pass ExportMetadata.to_props()). external_data: keep weights in
    `<name>.data` beside the file (None: only when they exceed 2 GB). Written atomically."""
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise VditError(f"{out_path}: the output file must end in .onnx")
    if len(example_inputs) != 3:
        raise VditError(f"example_inputs must be (x_t, t, y), got {len(example_inputs)} tensors")
    batch = _check_batch(batch, fixed_batch, example_inputs[0].shape[0])
    check_output(out_path)
    with temp_dir(out_path) as tmp:   # same filesystem: the renames below are atomic
        _export(module, example_inputs, tmp / out_path.name, DENOISER_INPUTS, DENOISER_OUTPUTS,
                (True, True, True), batch, opset, metadata, external_data)
        for file in tmp.iterdir():   # the .onnx last: a reader never sees it without its .data
            if file.suffix != ".onnx":
                os.replace(file, out_path.parent / file.name)
        os.replace(tmp / out_path.name, out_path)
    return out_path


def _check_batch(batch, fixed_batch, example_batch):
    if fixed_batch is not None:
        if fixed_batch < 1:
            raise VditError(f"fixed batch must be >= 1, got {fixed_batch}")
        if example_batch != fixed_batch:
            raise VditError(f"example inputs have batch {example_batch}, the fixed batch is {fixed_batch}")
        return None
    lo, hi = batch
    if not 1 <= lo <= hi:
        raise VditError(f"batch range must be 1 <= MIN <= MAX, got {lo}:{hi}")
    if hi < 2:   # torch.export specialises a dimension whose only value is 1
        raise VditError(f"a dynamic batch range needs MAX >= 2 (got {lo}:{hi}); use a fixed batch of 1 instead")
    if not lo <= example_batch <= hi:
        raise VditError(f"example inputs have batch {example_batch}, outside the batch range {lo}:{hi}")
    return lo, hi


# ---- a vdit checkpoint -> export directory ---------------------------------------------------
def _io(cfg, kind: str, batch_name: str) -> dict:
    video = [batch_name, *cfg.video_shape]
    spec = lambda name, shape, dtype, layout: {"name": name, "shape": shape, "dtype": dtype, "layout": layout}
    inputs = [spec("x_t", video, "float32", "NCFHW noisy video latents"),
              spec("t", [batch_name], "float32", "diffusion timestep 0..T-1"),
              spec("y", [batch_name], "int32", f"class label 0..{cfg.num_classes - 1}, {cfg.null_label}=null")]
    if kind == STEP:
        inputs += [spec("guidance", [1], "float32", "classifier-free guidance scale"),
                   spec("coefs", [len(COEF_NAMES)], "float32", " ".join(COEF_NAMES)),
                   spec("noise", video, "float32", "N(0, I) for sigma > 0, else zeros"),
                   spec("x0_prev", video, "float32", "the previous step's x0 output (zeros at the first step)"),
                   spec("corr", video, "float32", "the previous step's corr_next output (zeros at the first step)")]
        outputs = [spec("x_prev", video, "float32", "NCFHW video at the next (earlier) timestep"),
                   spec("x0", video, "float32", "this step's clipped data prediction (the next x0_prev)"),
                   spec("corr_next", video, "float32", "UniPC's corrector part for the next step (the next corr)")]
    else:
        outputs = [spec("eps", video, "float32", "NCFHW predicted noise")]
    return {"inputs": inputs, "outputs": outputs}


def versions() -> dict:
    import onnx
    import onnxscript

    import vdit_deploy
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "vdit-deploy": vdit_deploy.__version__, "exporter": "torch.onnx dynamo"}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, batch: tuple[int, int] = DEFAULT_BATCH,
                      fixed: int | None = None, opset: int = OPSET,
                      external_data: bool | None = None) -> Path:
    """checkpoint dir -> out_dir/{denoiser,step}.onnx, written atomically (the directory is replaced).

    batch (min, max) is the number of videos per call; denoiser.onnx accepts up to 2*max so that a
    host-side guided step (cond + null) fits. fixed=N: static shapes, both graphs take exactly N."""
    if opset < 17:
        raise VditError(f"opset must be >= 17 (LayerNormalization), got {opset}")
    n = fixed or max(2, batch[0])            # the batch traced (the fused step runs twice that)
    check_memory(read_info(checkpoint).model.memory_bytes(2 * n), f"exporting at batch {n}")   # before loading
    model, info = load_model(checkpoint)
    cfg = info.model
    for p in model.parameters():
        p.requires_grad_(False)
    denoiser = model      # fed y as int32: nn.Embedding's Gather takes it, so no Cast in the graph
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *cfg.video_shape, generator=g)
    t = torch.full((n,), info.schedule.num_timesteps / 2)
    y = torch.arange(n, dtype=torch.int32) % cfg.num_classes
    common = dict(config=cfg, schedule=info.schedule, checkpoint_sha256=info.sha256(), versions=versions(),
                  checkpoint_path=str(Path(checkpoint).resolve()))
    if fixed is not None:
        den_batch = step_batch = None
        den_meta, step_meta = {"fixed": fixed}, {"fixed": fixed}
    else:
        _check_batch(batch, None, n)
        den_batch, step_batch = (batch[0], 2 * batch[1]), tuple(batch)
        den_meta, step_meta = {"min": den_batch[0], "max": den_batch[1]}, {"min": batch[0], "max": batch[1]}
    bname = "batch" if fixed is None else str(fixed)
    out_dir = Path(out_dir)
    with atomic_path(out_dir, is_dir=True, marker=variant_file(DENOISER)) as tmp:
        meta = ExportMetadata(DENOISER, io=_io(cfg, DENOISER, bname), batch=den_meta, **common)
        _export(denoiser, (x, t, y), tmp / variant_file(DENOISER), DENOISER_INPUTS, DENOISER_OUTPUTS,
                (True, True, True), den_batch, opset, meta.to_props(), external_data)
        coefs = torch.tensor([1.5, 0.5, 1.0, 0.9, 0.0, 0.4, 0.1, 0.2, 0.3, 0.5, 0.1, 0.2, 0.3])
        state = (torch.randn_like(x), torch.randn_like(x))
        meta = ExportMetadata(STEP, io=_io(cfg, STEP, bname), batch=step_meta, **common)
        _export(FusedStep(denoiser, cfg.null_label), (x, t, y, torch.tensor([2.0]), coefs, torch.randn_like(x), *state),
                tmp / variant_file(STEP), STEP_INPUTS, STEP_OUTPUTS, (True, True, True, False, False, True, True, True),
                step_batch, opset, meta.to_props(), external_data)
    return out_dir
