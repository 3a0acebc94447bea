"""A model (vdit checkpoint, diffusers directory, any nn.Module with a contract) -> ONNX graphs with metadata.

    denoiser.onnx  (x_t (B,C,F,H,W) f32, t (B,) f32, *cond) -> out (B,kC,F,H,W) f32      (contract.py)
    step.onnx      (x_t, t, *cond, *null_cond, guidance (1,) f32, coefs (16,) f32, noise, x0_prev, corr)
                   -> x_prev, x0, corr_next
                   classifier-free guidance (the conditioning and the null conditioning as one 2B batch,
                   null inputs named null_<name>), the conversion of eps/v/x0 and the affine update of
                   samplers.apply_step inside the graph, a learned variance (eps+var models) for DDPM's
                   ancestral noise, with the multistep solvers' state (previous x0, UniPC's corrector
                   part; all (B,C,F,H,W) f32) in and out: a GPU runtime keeps the video and the state on
                   the device for the whole loop, the host only feeds scalars and noise.
    null_cond.safetensors  the null conditioning, batch 1 (the runtimes repeat it into null_<name>)

Exporter: torch.onnx's dynamo exporter (torch.export + onnxscript + its graph optimizer). On the tiny
preset it gives 420 nodes against TorchScript's 1466: TorchScript traces every `x.shape[i]` into
Shape/Gather/Unsqueeze/Concat chains (101 Shape, 187 Unsqueeze, 505 Constant, 35 Cast, int64
arithmetic between the layers), while dynamo keeps symbolic shapes in torch.export and folds them
into 8 Shape ops, LayerNormalization and plain MatMul/Softmax attention, with no Sequence ops. Fewer
int64 shape subgraphs is what TensorRT's parser and its dynamic-shape profiles want. The batch and
the contract's named axes (a text model's token count) stay dynamic.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from vdit_deploy.config import check_memory
from vdit_deploy.contract import BATCH
from vdit_deploy.errors import VditError
from vdit_deploy.export.metadata import ExportMetadata
from vdit_deploy.export.step_module import GuidedUpdate  # noqa: F401 (callers import it from here)
from vdit_deploy.export.tracing import (DEFAULT_BATCH, OPSET, ExportFailed, _check_batch, _export, _io,
                                        _weights_bytes, check_options, compose_step, denoiser_inputs,
                                        example_inputs, fixed_sizes, traced_size, versions)
from vdit_deploy.export.tracing import _check_saved, _trace, export_denoiser, step_inputs  # noqa: F401
from vdit_deploy.export.variants import DENOISER, STEP, variant_file
from vdit_deploy.files import atomic_path
from vdit_deploy.progress import note
from vdit_deploy.threads import apply_torch


def export_source(source, out_dir: str | Path, batch: tuple[int, int] = DEFAULT_BATCH, fixed: int | None = None,
                  opset: int = OPSET, external_data: bool | None = None, keep_foreign: bool = False,
                  progress: bool = False, cache_split: int | None = None, log=None) -> Path:
    """export_directory with the batch fallback: a family whose forward pins the batch (families/) is
    exported at a fixed batch (the range's minimum) at once, and a dynamic batch that fails to trace or
    comes out static falls back to it; `log` gets the one-line note (default: stderr)."""
    import sys

    note_ = log or (lambda line: print(line, file=sys.stderr))
    rest = dict(opset=opset, external_data=external_data, keep_foreign=keep_foreign, progress=progress,
                cache_split=cache_split)
    if fixed is None and source.contract.family:
        from vdit_deploy import families

        family = families.by_name(source.contract.family["name"])
        if not family.dynamic_batch:
            note_(f"note: {family.cls} is exported at a fixed batch of {batch[0]}: {family.batch_note} "
                  "(--fixed-batch N for another)")
            return export_directory(source, out_dir, batch, batch[0], **rest)
    if fixed is not None or cache_split is not None:     # step caching's split needs the dynamic batch
        return export_directory(source, out_dir, batch, fixed, **rest)
    try:
        return export_directory(source, out_dir, batch, None, **rest)
    except ExportFailed as e:
        note_(f"note: the batch could not stay dynamic ({e}); exporting at a fixed batch of {batch[0]} "
              "(--fixed-batch N for another)")
        return export_directory(source, out_dir, batch, batch[0], **rest)


def export_directory(source, out_dir: str | Path, batch: tuple[int, int] = DEFAULT_BATCH, fixed: int | None = None,
                     opset: int = OPSET, external_data: bool | None = None, keep_foreign: bool = False,
                     progress: bool = False, cache_split: int | None = None) -> Path:
    """A Source (sources.py: module + contract + null conditioning) -> out_dir/{denoiser,step}.onnx and
    null_cond.safetensors, written atomically (the directory is replaced).

    batch (min, max) is the number of videos per call; denoiser.onnx accepts up to 2*max so that a
    host-side guided step (cond + null) fits. fixed=N: a static batch, both graphs take exactly N (the
    contract's named axes stay dynamic). progress: one stderr line per stage (vdit_deploy/progress.py).
    cache_split=K: also step caching's head/tail graphs cut after block K (export/cache_export.py).

    An existing export in out_dir is replaced whole. Other files beside its graphs (fp16/int8 variants,
    engines, calibration sets: made from the graphs this export replaces) are refused, as `vdit export`
    refuses them, unless keep_foreign: then they are carried into the new directory as they are."""
    from vdit_deploy.contract import save_null
    from vdit_deploy.export.metadata import export_own_files

    apply_torch()
    check_options(batch, fixed, opset)
    contract, denoiser = source.contract, source.module.eval()
    if cache_split is not None:   # before any work: a model it cannot split, a K out of range, a fixed batch
        from vdit_deploy.cache_split import split
        if fixed is not None:
            raise VditError("--cache-split takes a dynamic batch export (no --fixed-batch)")
        split(denoiser, cache_split, len(contract.names))
    n = fixed or traced_size(batch[0], batch[1], fixed_sizes(contract))   # the batch traced (a step's runs 2n)
    example = example_inputs(contract, n)
    common = dict(contract=contract, model=source.model, checkpoint_sha256=source.sha256 or "0" * 64,
                  versions=versions(), checkpoint_path=str(Path(source.path).resolve()) if source.path else "")
    if fixed is not None:
        den_range = step_range = (fixed, fixed)
        den_meta, step_meta = {"fixed": fixed}, {"fixed": fixed}
    else:
        _check_batch(batch, None, n)
        den_range, step_range = (batch[0], 2 * batch[1]), tuple(batch)
        den_meta, step_meta = {"min": den_range[0], "max": den_range[1]}, {"min": batch[0], "max": batch[1]}
    bname = "batch" if fixed is None else str(fixed)
    video_axes = [BATCH] + [None] * 4
    cond_axes = [[a if isinstance(a, str) else None for a in c.shape] for c in contract.cond]
    out_dir = Path(out_dir)
    foreign = export_own_files(out_dir, refuse=not keep_foreign)
    say = note if progress else (lambda message: None)
    with atomic_path(out_dir, is_dir=True, marker=variant_file(DENOISER)) as tmp:
        say(f"export 1/2: tracing {variant_file(DENOISER)} with torch.export ({_weights_bytes(denoiser) / 1e6:.0f} MB "
            "of weights; the longest stage: seconds for a small model, minutes for 1 B parameters)")
        meta = ExportMetadata(DENOISER, io=_io(contract, DENOISER, bname), batch=den_meta, **common)
        _export(denoiser, example, tmp / variant_file(DENOISER), denoiser_inputs(contract), ("out",),
                [video_axes, [BATCH], *cond_axes], {**contract.axes, BATCH: den_range}, opset, meta.to_props(),
                external_data)
        say(f"export 2/2: composing {variant_file(STEP)} (the denoiser graph + the guided update)")
        meta = ExportMetadata(STEP, io=_io(contract, STEP, bname), batch=step_meta, **common)
        rows = tmp / variant_file(DENOISER)                      # a denoiser taking the 2B rows of a step
        if fixed is not None:                                    # denoiser.onnx takes N: trace one at 2N
            rows = tmp / "rows" / variant_file(DENOISER)
            rows.parent.mkdir()
            _export(denoiser, example_inputs(contract, 2 * fixed), rows, denoiser_inputs(contract), ("out",),
                    [video_axes, [BATCH], *cond_axes], contract.axes, opset, None, external_data)
        compose_step(rows, tmp / variant_file(STEP), contract, step_range, opset, meta.to_props(),
                     rows.with_name(rows.name + ".data").is_file())
        if fixed is not None:
            shutil.rmtree(rows.parent)
        if cache_split is not None:
            from vdit_deploy.export.cache_export import export_cache_graphs
            export_cache_graphs(source, tmp, cache_split, den_range, step_range, opset, common,
                                _io(contract, DENOISER, bname), _io(contract, STEP, bname), external_data)
        if contract.cond:
            save_null(source.null, tmp)
        for name in foreign:                                     # keep_foreign: carried over as they are
            os.replace(out_dir / name, tmp / name)
    return out_dir


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, batch: tuple[int, int] = DEFAULT_BATCH,
                      fixed: int | None = None, opset: int = OPSET, external_data: bool | None = None,
                      keep_foreign: bool = False, progress: bool = False, cache_split: int | None = None,
                      log=None, **source_options) -> Path:
    """A model directory (vdit checkpoint or diffusers save_pretrained) -> export directory. The model
    is sized before it is loaded (a vdit checkpoint from its config, a diffusers one from its weights)."""
    from vdit_deploy.checkpoint import read_info
    from vdit_deploy.sources import is_diffusers_dir, load_source

    check_options(batch, fixed, opset)                       # before anything is loaded or traced
    n = fixed or max(2, batch[0])
    if not Path(checkpoint).is_dir():
        raise VditError(f"{checkpoint}: no such model directory")
    if is_diffusers_dir(checkpoint):
        source_options["batch"] = 2 * n                      # sized from its config and headers, then loaded
    else:
        check_memory(read_info(checkpoint).model.memory_bytes(2 * n), f"exporting at batch {n}")   # before loading
    from vdit_deploy.export.metadata import export_own_files

    export_own_files(out_dir, refuse=not keep_foreign)          # before the model is loaded
    if progress:
        note(f"export: loading {checkpoint}")
    source = load_source(checkpoint, **source_options)
    return export_source(source, out_dir, batch, fixed, opset, external_data, keep_foreign, progress, cache_split,
                         log)
