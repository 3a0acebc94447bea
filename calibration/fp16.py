"""FP16 for ONNX Runtime: half the weights and bandwidth, with the overflow-prone ops kept in fp32.

fp16 tops out at 65504: LayerNorm's sum of squares, softmax's exp, a Pow (x**2 in a decomposed
norm or GELU) and the sin-cos timestep embedding (t up to 999 times frequencies: fp16 keeps 3
significant digits of the angle) overflow or lose what diffusion needs. onnxruntime's own float16
converter (onnxruntime.transformers.float16, shipped with onnxruntime) casts everything else and
inserts Casts around the blocked nodes; inputs and outputs stay float32 so callers do not change.
TensorRT's fp16 build pins the same layer types (runtimes/trt_network.py FP32_LAYER_TYPES).

The fused step graph gets the same treatment (step.fp16.onnx: what a strongly typed TensorRT 11
fp16 build compiles), except that the step's own arithmetic stays fp32 too: a*x_t reaches ~600 near
t=T, and the re-derived eps (a*x_t - x0)/b would keep only fp16's 3 digits of that difference.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vdit_deploy.calibration.graph import select, step_nodes
from vdit_deploy.errors import VditError
from vdit_deploy.export.metadata import find_onnx, read_metadata, stamp
from vdit_deploy.export.variants import DENOISER, FP16, STEP, variant_file
from vdit_deploy.files import atomic_path, check_output, temp_dir

FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Exp", "Sin", "Cos")
# The timestep embedding: sin-cos of t, then its MLP. Latte / PixArt's adaln_single also holds the one
# modulation linear that scales every token of every block: in fp16 it cost 20x the error of the rest
# (tiny Latte: output rel L2 1.2e-2 -> 5e-4 on the calibration set in tests/test_calibration.py).
FP32_LAYERS = (r"^t_embedder/", r"^net\.adaln_single\.")


def save_variant(model, path: Path, precision: str, data: Path | None = None) -> Path:
    """Stamp vdit.precision on a converted graph and write it atomically beside the fp32 one. data: its
    external data file, already written (named path.name + ".data" in the model): moved in first, so
    a reader never finds the graph without it; without one, a stale <path>.data of an earlier variant goes."""
    import os

    import onnx

    stamp(model, {"vdit.precision": precision})
    model.producer_name = "vdit-deploy"
    beside = path.with_name(path.name + ".data")
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
        if data is not None:
            os.replace(data, beside)
    if data is None:
        beside.unlink(missing_ok=True)
    return path


def variant_sources(export_dir) -> list[Path]:
    """The fp32 graphs a precision variant is made from: denoiser.onnx, and step.onnx beside it when
    export_dir is an export directory that has one."""
    src = find_onnx(export_dir, DENOISER)
    step = src.with_name(variant_file(STEP))
    return [src, step] if Path(export_dir).is_dir() and step.is_file() else [src]


def to_fp16(src: Path, kind: str, keep_fp32=FP32_LAYERS):
    """One fp32 graph -> an fp16 onnx model (float32 I/O) with the blocked ops and layers in fp32."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    blocked_nodes = select(model, keep_fp32) + (step_nodes(model) if kind == STEP else [])
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST + list(FP32_OPS),
                                     node_block_list=blocked_nodes)
    return drop_round_trips(model)


def unique_outputs(nodes):
    """onnxruntime < 1.32's converter adds one Cast per consumer of a shared fp16 tensor, all named
    alike and writing the same output: ONNX Runtime then refuses the graph ("two nodes with same node
    name"). Keep the first node that writes each tensor; the repeats are identical Casts."""
    written, unique = set(), []
    for n in nodes:
        if n.op_type == "Cast" and n.output[0] in written:
            continue
        written.update(n.output)
        unique.append(n)
    return unique


def drop_round_trips(model):
    """The converter stores every blocked node's output as fp16 and casts it back to fp32 for the next
    blocked node (fp32 -> fp16 -> fp32), so a chain of "fp32" ops still rounds to fp16 between ops: the
    sin-cos angle t*freq, the step's a*x_t. Feed such consumers the fp32 tensor itself."""
    from onnx import TensorProto, helper
    from onnxruntime.transformers.onnx_model import OnnxModel

    g = model.graph
    dtype = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    dtype.update({i.name: i.data_type for i in g.initializer})
    producer = {o: n for n in g.node for o in n.output}
    cast_to = lambda n: next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None
    outputs = {o.name for o in g.output}
    renamed, dropped = {}, set()
    for n in g.node:
        up = producer.get(n.input[0]) if cast_to(n) == TensorProto.FLOAT else None
        if up is not None and cast_to(up) == TensorProto.FLOAT16 and dtype.get(up.input[0]) == TensorProto.FLOAT:
            if n.output[0] in outputs:          # the graph output keeps its name: an Identity of the fp32 value
                n.CopyFrom(helper.make_node("Identity", [up.input[0]], [n.output[0]], name=n.name))
            else:
                renamed[n.output[0]] = up.input[0]
                dropped.add(n.name)
    kept = [n for n in g.node if n.name not in dropped]
    for n in kept:
        n.input[:] = [renamed.get(i, i) for i in n.input]
    used = {i for n in kept for i in n.input} | outputs        # fp16 casts that fed only the dropped ones
    kept = [n for n in kept if not (cast_to(n) == TensorProto.FLOAT16 and n.output[0] not in used)]
    kept = unique_outputs(kept)
    del g.node[:]
    g.node.extend(kept)
    live = {o for n in kept for o in n.output}      # (the converter's entries for inputs can be stale)
    keep_info = list({v.name: v for v in g.value_info if v.name in live}.values())
    del g.value_info[:]
    g.value_info.extend(keep_info)
    OnnxModel.graph_topological_sort(g)     # the converter appends its Casts at the end of the node list
    return model


def convert_fp16(export_dir, calib_dir=None, keep_fp32=FP32_LAYERS) -> Path:
    """export_dir/denoiser.onnx -> export_dir/denoiser.fp16.onnx (float32 I/O), and step.onnx ->
    step.fp16.onnx when the export has one; with calib_dir the set is loaded and checked against the
    export first, the converted denoiser is run on it before anything is written, and both graphs are
    refused if it makes any inf/NaN. Returns the denoiser's path."""
    from vdit_deploy.calibration.collect import load_calibration_set

    export_dir = Path(export_dir)
    src, *step = variant_sources(export_dir)
    out = src.with_name(variant_file(DENOISER, FP16))
    for path in [out, *(p.with_name(variant_file(STEP, FP16)) for p in step)]:
        check_output(path)
    cset = None
    if calib_dir is not None:     # a typo'd or foreign set is refused before any conversion or write
        meta = read_metadata(src)
        cset = load_calibration_set(calib_dir, meta.checkpoint_sha256, meta.contract)
    model = to_fp16(src, DENOISER, keep_fp32)
    if cset is not None:
        with temp_dir(out) as tmp:
            save_variant(model, tmp / out.name, "fp16")
            report = fp16_errors(tmp / out.name, src, cset)
        if report["nonfinite"]:
            raise VditError(f"fp16 graph makes inf/NaN on {report['nonfinite']} calibration rows "
                            f"(first at t={report['nonfinite_t'][0]:g}); not written")
    graphs = {out: model, **{p.with_name(variant_file(STEP, FP16)): to_fp16(p, STEP, keep_fp32) for p in step}}
    publish_variant(graphs, FP16)
    return out


def publish_variant(graphs: dict, precision: str) -> None:
    """{final path: onnx model} of one variant -> all written, or none: each is saved into one scratch
    directory beside them first (a full disk fails there), then placed by publish_files."""
    import os

    import onnx

    first = next(iter(graphs))
    with temp_dir(first) as tmp:
        for path, model in graphs.items():
            stamp(model, {"vdit.precision": precision})
            model.producer_name = "vdit-deploy"
            onnx.save(model, str(tmp / path.name))
            os.chmod(tmp / path.name, 0o644)
        publish_files(tmp, list(graphs))


def publish_files(tmp: Path, paths) -> None:
    """tmp/<name> -> each path, all or none: renamed into place the denoiser last (a reader that finds
    it finds its step graph too). The files they replace are kept (hard links in tmp) until every
    rename succeeded; if one fails, each replaced file is put back and each new one removed, so the
    directory holds the earlier set (or none), never half of each."""
    import os
    import shutil

    kept = {}
    for path in paths:
        if path.is_file():
            kept[path] = tmp / f"{path.name}.replaced"
            kept[path].unlink(missing_ok=True)
            try:
                os.link(path, kept[path])
            except OSError:          # a file system without hard links
                shutil.copy2(path, kept[path])
    placed = []
    try:
        for path in sorted(paths, key=lambda p: p.name.startswith(DENOISER)):
            os.replace(tmp / path.name, path)
            placed.append(path)
    except BaseException:
        for path in reversed(placed):
            if path in kept:
                os.replace(kept.pop(path), path)
            else:
                path.unlink(missing_ok=True)
        raise
    finally:
        for link in kept.values():
            link.unlink(missing_ok=True)


def check_fp16(export_dir, calib_dir, precision: str = "fp16") -> dict:
    """Run the calibration set through the fp16 graph and fp32: inf/NaN rows and eps error per t."""
    from vdit_deploy.calibration.collect import load_calibration_set

    ref_path, path = find_onnx(export_dir, DENOISER), find_onnx(export_dir, DENOISER, precision)
    meta = read_metadata(ref_path)
    return fp16_errors(path, ref_path, load_calibration_set(calib_dir, meta.checkpoint_sha256, meta.contract))


def fp16_errors(path: Path, ref_path: Path, cset) -> dict:
    from vdit_deploy.calibration.collect import run_onnx
    from vdit_deploy.metrics import rel_l2

    got, ref = run_onnx(path, cset), run_onnx(ref_path, cset)
    bad = ~np.isfinite(got.reshape(len(got), -1)).all(axis=1)
    t = cset.arrays["t"][:len(got)]
    per_t = {float(v): rel_l2(np.nan_to_num(got[t == v]), ref[t == v]) for v in np.unique(t)[::-1]}
    return {"file": path.name, "rows": int(len(got)), "nonfinite": int(bad.sum()),
            "nonfinite_t": sorted({float(v) for v in t[bad]}, reverse=True),
            "eps_rel_l2": rel_l2(np.nan_to_num(got), ref), "eps_rel_l2_per_t": per_t}
