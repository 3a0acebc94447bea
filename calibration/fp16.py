"""FP16 for ONNX Runtime: half the weights and bandwidth, with the overflow-prone ops kept in fp32.

fp16 tops out at 65504: LayerNorm's sum of squares, softmax's exp, a Pow (x**2 in a decomposed
norm or GELU) and the sin-cos timestep embedding (t up to 999 times frequencies: fp16 keeps 3
significant digits of the angle) overflow or lose what diffusion needs. onnxruntime's own float16
converter (onnxruntime.transformers.float16, shipped with onnxruntime) casts everything else and
inserts Casts around the blocked nodes; inputs and outputs stay float32 so callers do not change.
TensorRT's fp16 build pins the same layer types (runtimes/trt_build.py FP32_LAYER_TYPES).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vdit_deploy.calibration.graph import select
from vdit_deploy.errors import VditError
from vdit_deploy.export.metadata import DENOISER, find_onnx, read_metadata
from vdit_deploy.files import atomic_path

FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Exp", "Sin", "Cos")
FP32_LAYERS = (r"^t_embedder/",)       # the timestep embedding: sin-cos of t, then its MLP


def save_variant(model, path: Path, precision: str) -> Path:
    """Stamp vdit.precision on a converted graph and write it atomically beside the fp32 one."""
    import onnx

    props = {p.key: p.value for p in model.metadata_props}
    props["vdit.precision"] = precision
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "vdit-deploy"
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return path


def convert_fp16(export_dir, calib_dir=None, keep_fp32=FP32_LAYERS) -> Path:
    """export_dir/denoiser.onnx -> export_dir/denoiser.fp16.onnx (float32 I/O); with calib_dir the
    result is checked on the calibration set and refused if it makes any inf/NaN."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    export_dir = Path(export_dir)
    src = find_onnx(export_dir, DENOISER)
    model = onnx.load(str(src))
    blocked_nodes = select(model, keep_fp32)
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST + list(FP32_OPS),
                                     node_block_list=blocked_nodes)
    out = save_variant(model, src.with_name(f"{DENOISER}.fp16.onnx"), "fp16")
    if calib_dir is not None:
        report = check_fp16(export_dir, calib_dir)
        if report["nonfinite"]:
            out.unlink()
            raise VditError(f"fp16 graph makes inf/NaN on {report['nonfinite']} calibration rows "
                            f"(first at t={report['nonfinite_t'][0]:g}); not written")
    return out


def check_fp16(export_dir, calib_dir, precision: str = "fp16") -> dict:
    """Run the calibration set through the fp16 graph and fp32: inf/NaN rows and eps error per t."""
    from vdit_deploy.calibration.collect import load_calibration_set, run_onnx
    from vdit_deploy.metrics import rel_l2

    ref_path, path = find_onnx(export_dir, DENOISER), find_onnx(export_dir, DENOISER, precision)
    meta = read_metadata(ref_path)
    cset = load_calibration_set(calib_dir, meta.checkpoint_sha256, meta.config)
    got, ref = run_onnx(path, cset), run_onnx(ref_path, cset)
    bad = ~np.isfinite(got.reshape(len(got), -1)).all(axis=1)
    t = cset.arrays["t"][:len(got)]
    per_t = {float(v): rel_l2(np.nan_to_num(got[t == v]), ref[t == v]) for v in np.unique(t)[::-1]}
    return {"file": path.name, "rows": int(len(got)), "nonfinite": int(bad.sum()),
            "nonfinite_t": sorted({float(v) for v in t[bad]}, reverse=True),
            "eps_rel_l2": rel_l2(np.nan_to_num(got), ref), "eps_rel_l2_per_t": per_t}
