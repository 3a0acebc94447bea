"""Per-timestep-bin Q/DQ scales, as a runtime reads them (written by calibration/int8_bins.py).

A Q/DQ graph with `vdit.int8_bins` metadata holds one set of activation scales fitted on every
timestep as its initializers and, in the metadata, the values each timestep bin replaces them with:

    {"edges": [t1, ..., t_{N-1}] ascending, "timesteps": [[bin 0's recorded t], ...],
     "tensors": {initializer name: {"dtype", "shape", "bins": [[bin 0 values], ...]}}}

Bin k holds timesteps in [edges[k-1], edges[k]) (bin 0 the lowest t). A runtime that knows nothing of
bins runs the file's own (single) scales; ONNX Runtime opens one session per bin (runtimes/ort_runtime.py).

An INT8 graph with `vdit.int8_float_above` metadata ({"t": t_f, "steps": K, "sampler": ..., "of": N})
runs its calls at timesteps t >= t_f in float: ONNX Runtime opens the export's fp32 graph of the same
kind beside it and takes it for those calls (`vdit calibrate int8 --float-steps K`, default 2 for Q/DQ:
t_f is the K-th step of the calibration set's sampler). The first, noisiest steps decide each video's
layout, and an error there is amplified along the whole trajectory: on the shipped checkpoint with
UniPC 15, the second step's Q/DQ error alone costs more than the other 14 steps' together (docs/calibration.md).
"""
from __future__ import annotations

import json

import numpy as np

from vdit_deploy.errors import VditError

BINS_KEY = "vdit.int8_bins"
FLOAT_KEY = "vdit.int8_float_above"


def _record(custom_metadata: dict, key: str, required, where: str) -> dict | None:
    """The JSON object under `key` in a graph's metadata, with `required` keys, or None when absent."""
    from vdit_deploy import validate as v

    raw = custom_metadata.get(key)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        raise VditError(f"{where}: {key} is not JSON") from None
    v.obj(data, key, required=required, where=where, extra_ok=True)
    return data


def bin_of(t, edges) -> np.ndarray:
    """The bin index of each timestep (an array or a number)."""
    return np.searchsorted(np.asarray(edges, np.float64), np.asarray(t, np.float64), side="right")


def read_bins(custom_metadata: dict, where: str):
    """A graph's per-bin tables -> (edges, [{name: array} per bin]), or None when it has one set of scales.
    Untrusted metadata: checked, one-line errors."""
    from vdit_deploy import validate as v

    data = _record(custom_metadata, BINS_KEY, ("edges", "tensors"), where)
    if data is None:
        return None
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


def read_float_above(custom_metadata: dict, where: str) -> float | None:
    """The timestep from which a graph's calls run in float (FLOAT_KEY), or None. Untrusted metadata:
    checked, one-line errors."""
    from vdit_deploy import validate as v

    data = _record(custom_metadata, FLOAT_KEY, ("t",), where)
    return None if data is None else float(v.number(data["t"], f"{FLOAT_KEY}.t", where=where))


def float_steps_text(custom_metadata: dict, where: str) -> str | None:
    """"t >= 881 (the first 2 of 15 unipc steps)" for a graph whose first steps run in float, else None."""
    t_f = read_float_above(custom_metadata, where)
    if t_f is None:
        return None
    first = _record(custom_metadata, FLOAT_KEY, ("t",), where)
    made = f" (the first {first['steps']} of {first['of']} {first['sampler']} steps)" \
        if {"steps", "of", "sampler"} <= set(first) else ""
    return f"t >= {t_f:g}{made}"


def float_note(custom_metadata: dict, name: str, who: str) -> str | None:
    """A line for a stage whose runtime runs one graph for every step (`who`: TensorRT, Triton) given a
    graph whose first steps ONNX Runtime runs in float; None for a graph without them."""
    if FLOAT_KEY not in custom_metadata:
        return None
    return (f"note: {name} runs its first steps in float on ONNX Runtime ({FLOAT_KEY}); {who} runs every "
            "step in INT8")


def int8_lines(path) -> list[str]:
    """`vdit info`'s lines for an INT8 graph file: its types and target (cpu_isa.META_KEY), its first
    steps in float and its per-bin scales; [] for a float graph."""
    from dataclasses import fields

    import onnx

    from vdit_deploy.runtimes.cpu_isa import Int8Choice, read_choice

    where = str(path)
    custom_metadata = {p.key: p.value for p in onnx.load(where, load_external_data=False).metadata_props}
    lines = []
    record = read_choice(custom_metadata)
    if record is not None:
        try:
            lines.append(f"int8       {Int8Choice(**{f.name: record[f.name] for f in fields(Int8Choice)}).describe()}")
        except (KeyError, TypeError):
            lines.append("int8       types not recorded in full (an older graph)")
    if (first := float_steps_text(custom_metadata, where)) is not None:
        lines.append(f"float at   {first}: ONNX Runtime runs those calls on the fp32 graph")
    if (bins := read_bins(custom_metadata, where)) is not None:
        lines.append(f"t bins     {len(bins[1])} sets of activation scales, edges {[round(e, 1) for e in bins[0]]}")
    return lines


def bins_note(custom_metadata: dict, name: str) -> str | None:
    """A line for a stage that builds one engine from a graph (file `name`) with per-bin scales
    (TensorRT): it gets the scales of every timestep, the file's own; None for one set of scales."""
    if BINS_KEY not in custom_metadata:
        return None
    return (f"note: {name} has per-timestep-bin Q/DQ scales ({BINS_KEY}); this engine uses the scales "
            "fitted on every timestep (ONNX Runtime runs the per-bin ones)")
