"""Per-timestep-bin Q/DQ scales, as a runtime reads them (written by calibration/int8_bins.py).

A Q/DQ graph with `vdit.int8_bins` metadata holds one set of activation scales fitted on every
timestep as its initializers and, in the metadata, the values each timestep bin replaces them with:

    {"edges": [t1, ..., t_{N-1}] ascending, "timesteps": [[bin 0's recorded t], ...],
     "tensors": {initializer name: {"dtype", "shape", "bins": [[bin 0 values], ...]}}}

Bin k holds timesteps in [edges[k-1], edges[k]) (bin 0 the lowest t). A runtime that knows nothing of
bins runs the file's own (single) scales; ONNX Runtime opens one session per bin (runtimes/ort_runtime.py).
"""
from __future__ import annotations

import json

import numpy as np

from vdit_deploy.errors import VditError

BINS_KEY = "vdit.int8_bins"


def bin_of(t, edges) -> np.ndarray:
    """The bin index of each timestep (an array or a number)."""
    return np.searchsorted(np.asarray(edges, np.float64), np.asarray(t, np.float64), side="right")


def read_bins(custom_metadata: dict, where: str):
    """A graph's per-bin tables -> (edges, [{name: array} per bin]), or None when it has one set of scales.
    Untrusted metadata: checked, one-line errors."""
    from vdit_deploy import validate as v

    raw = custom_metadata.get(BINS_KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        raise VditError(f"{where}: {BINS_KEY} is not JSON") from None
    v.obj(data, BINS_KEY, required=("edges", "tensors"), where=where, extra_ok=True)
    edges = data["edges"]
    if not isinstance(edges, list) or not all(isinstance(e, (int, float)) and np.isfinite(e) for e in edges) \
            or edges != sorted(edges):
        v.fail(where, f"{BINS_KEY}.edges must be an ascending list of timesteps")
    n = len(edges) + 1
    v.obj(data["tensors"], f"{BINS_KEY}.tensors", where=where, extra_ok=True)
    bins = [{} for _ in range(n)]
    for name, t in data["tensors"].items():
        v.obj(t, f"{BINS_KEY}.tensors[{name[:40]}]", required=("dtype", "shape", "bins"), where=where)
        if t["dtype"] not in ("float32", "float16", "int8", "uint8", "int32") or not isinstance(t["bins"], list) \
                or len(t["bins"]) != n:
            v.fail(where, f"{BINS_KEY}.tensors[{name[:40]}] must hold {n} bins of float32/float16/int8/uint8/int32")
        shape = v.int_list(t["shape"], "shape", None, 0, where=where)
        for k, values in enumerate(t["bins"]):
            try:
                a = np.asarray(values, dtype=t["dtype"])
            except (ValueError, TypeError):
                v.fail(where, f"{BINS_KEY}.tensors[{name[:40]}] bin {k} is not a list of numbers")
            if a.ndim != 1 or a.size != int(np.prod(shape)) or (a.dtype.kind == "f" and not np.isfinite(a).all()):
                v.fail(where, f"{BINS_KEY}.tensors[{name[:40]}] bin {k} must hold {int(np.prod(shape))} finite values")
            bins[k][name] = a.reshape(shape)
    return [float(e) for e in edges], bins


def bins_note(custom_metadata: dict, name: str) -> str | None:
    """A line for a stage that builds one engine from a graph (file `name`) with per-bin scales
    (TensorRT): it gets the scales of every timestep, the file's own; None for one set of scales."""
    if BINS_KEY not in custom_metadata:
        return None
    return (f"note: {name} has per-timestep-bin Q/DQ scales ({BINS_KEY}); this engine uses the scales "
            "fitted on every timestep (ONNX Runtime runs the per-bin ones)")
