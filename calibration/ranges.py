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

symmetric ranges [-m, m] for TensorRT's zero-point-free int8, [min, max] for a CPU's u8 activations.

ONNX Runtime keeps every output of a graph alive until a run ends, whichever are fetched, so a graph
whose calibrated activations exceed `budget` bytes (shapes inferred on the weightless graph with its
inputs bound to the first feed's) is fitted in passes: one augmented graph per group of tensors that
fits (graph order), each over all the batches, at the price of one forward pass per group and batch.
So peak memory is the ONNX Runtime session (weights, one forward's live intermediates) + at most
`budget` of calibrated activations (or one tensor, if larger) + the histograms (2048 bins per tensor),
whatever the number of batches. The ranges go to quantize_static as its calibration cache (onnxruntime's own JSON format).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vdit_deploy.errors import VditError

FLOAT_TYPES = (1, 10)        # TensorProto.FLOAT, FLOAT16: what onnxruntime's calibrators calibrate
ITEMSIZE = {1: 4, 10: 2}
BUDGET = 512 << 20           # bytes of activations fetched from one run
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


def tensor_bytes(model, tensors, feed: dict) -> dict[str, int]:
    """Each tensor's size on this feed: the graph's shapes inferred with its inputs bound to the feed's
    (model: the graph without its weights' data); a tensor of unknown shape counts as the largest known."""
    import onnx

    bound = onnx.ModelProto()
    bound.CopyFrom(model)
    for i in bound.graph.input:
        if i.name in feed:
            for d, n in zip(i.type.tensor_type.shape.dim, np.shape(feed[i.name])):
                d.dim_value = int(n)           # replaces a symbolic dim_param ('batch')
    del bound.graph.value_info[:]
    bound = onnx.shape_inference.infer_shapes(bound, data_prop=True)
    infos = {vi.name: vi for vi in (*bound.graph.input, *bound.graph.value_info, *bound.graph.output)}
    sizes = {}
    for t in tensors:
        dims = infos[t].type.tensor_type.shape.dim if t in infos else []
        if dims and all(d.HasField("dim_value") for d in dims):
            sizes[t] = int(np.prod([d.dim_value for d in dims], dtype=np.int64)) * ITEMSIZE.get(
                infos[t].type.tensor_type.elem_type, 4)
    largest = max(sizes.values(), default=0)
    return {t: sizes.get(t, largest) for t in tensors}


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
    """Running per-tensor statistics of a stream of batches: minmax, percentile or entropy; symmetric
    (what TensorRT's explicit quantization takes) or not. `held`: the most bytes of activations added at once."""

    def __init__(self, method: str, symmetric: bool = True):
        self.method, self.symmetric, self.batches, self.held = method, symmetric, 0, 0
        self.lo: dict[str, np.ndarray] = {}
        self.hi: dict[str, np.ndarray] = {}
        self.histograms = None
        if method in HISTOGRAM:
            from onnxruntime.quantization.calibrate import HistogramCollector

            self.histograms = HistogramCollector(method=method, symmetric=symmetric, scenario="same",
                                                 **HISTOGRAM[method])

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
        """onnxruntime's TensorsData: [min, max] or symmetric [-m, m] per tensor (minmax), or its collector's
        thresholds."""
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

        if not self.batches:
            raise VditError("no calibration batch fits the graph's batch range")
        if self.histograms is not None:
            method = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[self.method]
            return TensorsData(method, self.histograms.compute_collection_result())
        pairs = {}
        for name in self.lo:
            lo, hi = np.float32(self.lo[name]), np.float32(self.hi[name])
            m = np.maximum(np.abs(lo), np.abs(hi))
            pairs[name] = (-m, m) if self.symmetric else (lo, hi)
        return TensorsData(CalibrationMethod.MinMax, pairs)


def stream_outputs(graph_path: Path, tensors, feeds, work: Path, fold, budget: int = BUDGET) -> None:
    """Run the graph at graph_path (weights inline or beside it) over feeds() and hand each batch's values
    of `tensors` to fold(first_pass, {name: array}), nothing kept: in one pass when a batch's tensors fit
    in `budget` bytes, else one pass per group that fits (groups sized on the first feed: the calibration
    batches share a shape), feeds() drawn anew for each. first_pass: count the batch there."""
    import onnx
    import onnxruntime as ort

    from vdit_deploy.threads import session_options

    model = onnx.load(str(graph_path), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    options = session_options()       # --threads; the graph as exported, as onnxruntime's calibrators run it
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    plan, done = None, 0
    while plan is None or done < len(plan):
        session = None
        for feed in feeds():
            feed = {k: np.ascontiguousarray(feed[k]) for k in inputs}
            if plan is None:
                plan = groups(tensors, tensor_bytes(model, tensors, feed), budget)
            if session is None:      # this group's outputs only: the others are never computed into memory
                graph = augmented_graph(graph_path, plan[done], work / "augmented.onnx")
                session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
            outs = session.run(plan[done], feed)
            fold(done == 0, dict(zip(plan[done], outs)))
            del outs, feed
        if plan is None:
            return                   # no batch at all
        del session
        done += 1


def fit_ranges(fp32: Path, nodes, feeds, method: str, work: Path, budget: int = BUDGET, symmetric: bool = True):
    """Ranges of the activations of `nodes` in the graph at fp32 (weights beside it). feeds() returns a
    fresh iterable of feed dicts, drawn one at a time, once per group of tensors (stream_outputs).
    Returns (TensorsData, the RangeCollector)."""
    import onnx

    tensors = calibration_tensors(onnx.load(str(fp32), load_external_data=False), nodes)
    collector = RangeCollector(method, symmetric)

    def fold(first_pass, outputs):
        if first_pass:
            collector.next_batch()
        collector.add(outputs)

    stream_outputs(fp32, tensors, feeds, work, fold, budget)
    return collector.ranges(), collector
