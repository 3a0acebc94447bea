"""Activation ranges for static Q/DQ, fitted one calibration batch at a time in bounded memory.

onnxruntime.quantization's calibrators make every input and output of every MatMul / Gemm / Conv a
graph output (attention's QK^T scores included, though they stay float) and keep the outputs of every
batch until the end: 5.2 GB for the 7 MB shipped model. Here the graph outputs only the tensors Q/DQ
gives a range (`calibration_tensors`: the float activations of the nodes it quantizes), shares the
fp32 graph's external weights instead of copying them, and folds each batch into running statistics
before the next is drawn from the (lazy) feeds:

    minmax              running min / max per tensor
    percentile, entropy onnxruntime's own HistogramCollector, fed one batch at a time (its histograms
                        grow in place; the thresholds are computed by the same code as in onnxruntime)

A batch whose calibrated activations exceed `budget` bytes (shapes from the graph's value_info, its
symbolic dims bound by the feed) is run once per group of tensors that fits, in graph order: ONNX
Runtime frees every intermediate it is not asked to return, so the activations held at once stay
under the budget (or one tensor, if larger) at the price of one forward pass per group.
So peak memory is the ONNX Runtime session (weights, one forward's live intermediates) + at most
`budget` of fetched activations + the histograms (2048 bins per tensor), whatever the number of
batches. The ranges go to quantize_static as its calibration cache (onnxruntime's own JSON format).
"""
from __future__ import annotations

import ast
import operator
from pathlib import Path

import numpy as np

from vdit_deploy.errors import VditError

FLOAT_TYPES = (1, 10)        # TensorProto.FLOAT, FLOAT16: what onnxruntime's calibrators calibrate
ITEMSIZE = {1: 4, 10: 2}
BUDGET = 512 << 20           # bytes of activations fetched from one run
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Div: operator.floordiv}
HISTOGRAM = {"percentile": dict(num_bins=2048, num_quantized_bins=128, percentile=99.99),
             "entropy": dict(num_bins=128, num_quantized_bins=128, percentile=99.999)}


def calibration_tensors(model, nodes) -> list[str]:
    """The activations Q/DQ needs a range for: each float input and output of the named nodes (what
    onnxruntime's QDQ MatMul / Gemm / Conv quantize) that is not a weight. In graph order, no repeats."""
    weights = {i.name for i in model.graph.initializer}
    weights |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output)}
    wanted, names = set(nodes), {}
    for n in model.graph.node:
        if n.name in wanted:
            for name in (*n.input, *n.output):
                if name and name not in weights and types.get(name, FLOAT_TYPES[0]) in FLOAT_TYPES:
                    names[name] = None
    return list(names)


def _dim(expr: str, env: dict) -> int:
    """A symbolic dim of the exporter ('batch', '4*batch', 's0 + 1') with the feed's values bound."""
    def ev(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.Name):
            return env[n.id]
        if isinstance(n, ast.BinOp) and type(n.op) in _OPS:
            return _OPS[type(n.op)](ev(n.left), ev(n.right))
        raise ValueError(expr)
    return ev(ast.parse(expr, mode="eval").body)


def tensor_bytes(model, tensors, feed: dict) -> dict[str, int]:
    """Each tensor's size on this feed, from the graph's shapes (its inputs' symbolic dims bound to the
    feed's arrays); a tensor of unknown shape counts as the largest known one."""
    env = {}
    for i in model.graph.input:
        if i.name in feed:
            for d, n in zip(i.type.tensor_type.shape.dim, np.shape(feed[i.name])):
                if d.dim_param:
                    env[d.dim_param] = int(n)
    infos = {vi.name: vi for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output)}
    sizes = {}
    for t in tensors:
        try:
            tt = infos[t].type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else _dim(d.dim_param, env) for d in tt.shape.dim]
            sizes[t] = int(np.prod(dims, dtype=np.int64)) * ITEMSIZE.get(tt.elem_type, 4)
        except (KeyError, ValueError, SyntaxError, ZeroDivisionError):
            sizes[t] = None
    largest = max((v for v in sizes.values() if v is not None), default=0)
    return {t: largest if v is None else v for t, v in sizes.items()}


def groups(tensors, sizes: dict, budget: int) -> list[list[str]]:
    """Consecutive runs of tensors (graph order) whose sizes add up to at most budget (a larger tensor alone)."""
    out, size = [[]], 0
    for t in tensors:
        if out[-1] and size + sizes[t] > budget:
            out.append([])
            size = 0
        out[-1].append(t)
        size += sizes[t]
    return out


def augmented_graph(src: Path, tensors, out: Path) -> Path:
    """src (its weights in external data beside it) -> a graph at `out` in the same directory whose
    outputs are `tensors` (the original outputs dropped), pointing at src's weight file: no copy."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    known = {vi.name: vi for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output)}
    del model.graph.output[:]
    model.graph.output.extend(known.get(t) or onnx.helper.make_empty_tensor_value_info(t) for t in tensors)
    onnx.save(model, str(out))
    return out


class RangeCollector:
    """Running per-tensor statistics of a stream of batches: minmax, percentile or entropy, symmetric
    (what TensorRT's explicit quantization takes). `held`: the most bytes of activations added at once."""

    def __init__(self, method: str):
        self.method, self.batches, self.held = method, 0, 0
        self.lo: dict[str, np.ndarray] = {}
        self.hi: dict[str, np.ndarray] = {}
        self.histograms = None
        if method in HISTOGRAM:
            from onnxruntime.quantization.calibrate import HistogramCollector

            self.histograms = HistogramCollector(method=method, symmetric=True, scenario="same", **HISTOGRAM[method])

    def add(self, outputs: dict[str, np.ndarray]) -> None:
        """Fold activations of the current batch in (all of its tensors, or a group); nothing is kept.
        Count a batch with next_batch() first."""
        self.held = max(self.held, sum(a.nbytes for a in outputs.values()))
        for name, a in outputs.items():
            if not np.isfinite(a).all():
                raise VditError(f"tensor {name[:60]!r} is NaN/inf on calibration batch {self.batches}: "
                                "the fp32 graph overflows on the calibration set")
        if self.histograms is not None:
            self.histograms.collect(outputs)
            return
        for name, a in outputs.items():
            lo, hi = a.min(), a.max()
            self.lo[name] = np.minimum(self.lo[name], lo) if name in self.lo else lo
            self.hi[name] = np.maximum(self.hi[name], hi) if name in self.hi else hi

    def next_batch(self) -> None:
        self.batches += 1

    def ranges(self):
        """onnxruntime's TensorsData: symmetric [-m, m] per tensor (minmax), or its collector's thresholds."""
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

        if not self.batches:
            raise VditError("no calibration batch fits the graph's batch range")
        if self.histograms is not None:
            method = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[self.method]
            return TensorsData(method, self.histograms.compute_collection_result())
        pairs = {}
        for name in self.lo:
            m = np.maximum(np.abs(self.lo[name]), np.abs(self.hi[name])).astype(np.float32)
            pairs[name] = (-m, m)
        return TensorsData(CalibrationMethod.MinMax, pairs)


def fit_ranges(fp32: Path, nodes, feeds, method: str, work: Path, budget: int = BUDGET):
    """Ranges of the activations of `nodes` in the graph at fp32 (weights beside it), from the feed
    dicts `feeds` (an iterable, drawn one at a time), at most `budget` bytes of activations fetched
    per run. Returns (TensorsData, the RangeCollector)."""
    import onnx
    import onnxruntime as ort

    from vdit_deploy.threads import session_options

    model = onnx.load(str(fp32), load_external_data=False)
    tensors = calibration_tensors(model, nodes)
    inputs = [i.name for i in model.graph.input]
    graph = augmented_graph(fp32, tensors, work / "augmented.onnx")
    del model.graph.node[:], model.graph.initializer[:]       # shapes are all tensor_bytes needs
    options = session_options()       # --threads; the graph as exported, as onnxruntime's calibrators run it
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    collector = RangeCollector(method)
    for feed in feeds:
        feed = {k: np.ascontiguousarray(feed[k]) for k in inputs}
        collector.next_batch()
        for group in groups(tensors, tensor_bytes(model, tensors, feed), budget):
            outs = session.run(group, feed)
            collector.add(dict(zip(group, outs)))
            del outs
        del feed
    return collector.ranges(), collector
