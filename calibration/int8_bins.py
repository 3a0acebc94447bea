"""Per-timestep-bin activation scales for the static Q/DQ graph (`vdit calibrate int8 --mode qdq --t-bins N`).

A diffusion model's activations change range along the trajectory: one set of Q/DQ scales fitted on
every timestep is too wide for the late, nearly clean steps and clips the early, noisy ones. With
--t-bins N the calibration set's recorded timesteps are split into N contiguous bins of (nearly)
equal size, and the graph is calibrated once per bin on that bin's calls. The weights are quantized
per channel from the weights alone, so the N graphs differ only in their activation scales (and zero
points, and a quantized bias where a Gemm's bias is quantized): one graph file is written, with the
scales fitted on all timesteps as its initializers (what a runtime that knows nothing of bins runs,
e.g. a TensorRT build), and the per-bin values of every initializer that differs in its metadata:

    vdit.int8_bins = {"edges": [t1, ..., t_{N-1}] ascending, "timesteps": [[bin 0's], ...],
                      "tensors": {name: {"dtype", "shape", "bins": [[bin 0 values], ...]}}}

Bin k holds timesteps in [edges[k-1], edges[k]) (bin 0 the lowest t). ONNX Runtime (runtimes/ort_runtime.py)
opens one session per bin from the same file, each with its bin's initializers overriding the
file's (SessionOptions.add_initializer), and runs each call on the session of its timestep.

`--float-steps K` (float_record) is the other per-timestep choice: the calls of the first K steps of the
calibration set's sampler run on the fp32 graph (runtimes/qdq_bins.py, FLOAT_KEY), and so do any
sampler's calls at those timesteps: the threshold t_f is halfway between that sampler's K-th and
(K+1)-th timesteps.
"""
from __future__ import annotations

import json

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.runtimes.qdq_bins import BINS_KEY



def check_bins(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise VditError(f"--t-bins must be a whole number of timestep bins >= 1, got {n!r}")
    return n


def split_timesteps(timesteps, n: int) -> tuple[list[float], list[list[float]]]:
    """The recorded timesteps -> (edges, timesteps per bin): n contiguous groups of nearly equal size,
    lowest t first, each edge halfway between two neighbouring groups."""
    ts = sorted({float(t) for t in timesteps})
    if n > len(ts):
        raise VditError(f"--t-bins {n} needs at least {n} recorded timesteps; the calibration set has {len(ts)} "
                        f"(collect it with `vdit calibrate collect --timesteps {n}` or more)")
    groups = [list(g) for g in np.array_split(np.array(ts), n)]
    edges = [(a[-1] + b[0]) / 2 for a, b in zip(groups, groups[1:])]
    return [float(e) for e in edges], [[float(t) for t in g] for g in groups]


def check_float_steps(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise VditError(f"--float-steps must be a whole number of steps >= 0, got {n!r}")
    return n


def float_record(cset, steps: int) -> dict | None:
    """FLOAT_KEY's record for running the first `steps` steps of the calibration set's sampler in float,
    None for 0: {"t": t_f, "steps", "sampler", "of": that sampler's step count}."""
    from vdit_deploy.sampling import sampler_plan

    if check_float_steps(steps) == 0:
        return None
    m = cset.manifest
    ts = [float(s.t) for s in sampler_plan(cset.contract, m["sampler"], m["steps"], m["eta"], m.get("order"),
                                           m.get("spacing"))]
    if steps >= len(ts):
        raise VditError(f"--float-steps {steps} leaves none of the calibration sampler's {len(ts)} steps in INT8")
    return {"t": (ts[steps - 1] + ts[steps]) / 2, "steps": steps, "sampler": m["sampler"], "of": len(ts)}


def subset(cset, timesteps):
    """A view of a calibration set with only the calls at these timesteps (the arrays are shared)."""
    from vdit_deploy.calibration.collect import CalibrationSet

    keep = {float(t) for t in timesteps}
    manifest = {**cset.manifest, "records": [r for r in cset.manifest["records"] if float(r["t"]) in keep]}
    return CalibrationSet(cset.path, manifest, cset.arrays, cset.contract)


def _structure(model) -> list:
    return [(n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]


def bin_tables(base, per_bin) -> dict:
    """{initializer name: {dtype, shape, bins}} for every initializer whose values differ between the
    per-bin graphs (onnx models with the same nodes as `base`, which is checked)."""
    from onnx import numpy_helper

    want = _structure(base)
    inits = [{i.name: i for i in m.graph.initializer} for m in per_bin]
    for m in per_bin:
        if _structure(m) != want or {i.name for i in m.graph.initializer} != {i.name for i in base.graph.initializer}:
            raise VditError("the per-bin Q/DQ graphs came out with different nodes (onnxruntime.quantization placed "
                            "Q/DQ differently per bin); use one set of scales (--t-bins 1)")
    tables = {}
    for init in base.graph.initializer:
        values = [numpy_helper.to_array(b[init.name]) for b in inits]
        if any(not np.array_equal(values[0], v) for v in values[1:]) or \
                not np.array_equal(values[0], numpy_helper.to_array(init)):
            tables[init.name] = {"dtype": str(values[0].dtype), "shape": list(values[0].shape),
                                 "bins": [v.ravel().tolist() for v in values]}
    return tables


def stamp_bins(model, edges, groups, tables) -> None:
    del_keys = [i for i, p in enumerate(model.metadata_props) if p.key == BINS_KEY]
    for i in reversed(del_keys):
        del model.metadata_props[i]
    model.metadata_props.add(key=BINS_KEY, value=json.dumps({"edges": edges, "timesteps": groups,
                                                                "tensors": tables}))


def quantize_bins(src, out, cset, batches_of, n: int, quantize, progress: bool = False):
    """One fp32 graph -> its Q/DQ variant at `out` with per-bin scales. quantize(src, out, batches):
    calibration/int8.quantize_graph with the rules bound; batches_of(cset) -> batches(lo, hi) for it."""
    import onnx

    from vdit_deploy.calibration.fp16 import save_variant
    from vdit_deploy.files import temp_dir
    from vdit_deploy.progress import note

    edges, groups = split_timesteps([r["t"] for r in cset.manifest["records"]], n)
    path = quantize(src, out, batches_of(cset))      # the scales of every timestep: the graph's own
    base = onnx.load(str(path))
    if n == 1:
        return path
    per_bin = []
    with temp_dir(out) as tmp:
        for k, group in enumerate(groups):
            if progress:
                note(f"int8 qdq: bin {k + 1}/{n} (t = {group[0]:g}..{group[-1]:g})")
            per_bin.append(onnx.load(str(quantize(src, tmp / f"bin{k}.onnx", batches_of(subset(cset, group))))))
    stamp_bins(base, edges, groups, bin_tables(base, per_bin))
    return save_variant(base, out, base_precision(base))


def base_precision(model) -> str:
    return next(p.value for p in model.metadata_props if p.key == "vdit.precision")
