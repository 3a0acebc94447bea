"""SmoothQuant-style migration of activation outliers into the weights (`vdit calibrate int8 --smooth ALPHA`).

A few input channels of a linear layer carry most of an activation's range, and one per-tensor INT8
scale sized for them leaves the other channels a handful of levels. For a MatMul / Gemm with constant
weights W (K input channels) SmoothQuant (Xiao et al., 2023) rescales each input channel j by

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)        X' = X / s,  W' = diag(s) W,  X' W' = X W

with max|X_j| over the calibration set's calls: alpha 0 leaves the activations alone, 1 moves their
whole range into the weights (quantized per output channel, where it costs less). Here 1/s is a Mul
inserted before each quantized MatMul (the Q/DQ pair then sits on the smoothed tensor); folding it into
the preceding LayerNorm or adaLN modulation would save that Mul, but the modulation's shift term and a
tensor read by several layers with different s make the Mul the general form. Without quantization the
graph computes the same function (to float rounding: tested to ~1e-5). The per-channel statistics are
streamed as the range fit streams (ranges.stream_outputs): each batch reduced and dropped, the tensors
fetched in groups of at most 512 MB.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vdit_deploy.errors import VditError


def check_alpha(alpha) -> float | None:
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise VditError(f"--smooth (SmoothQuant's alpha) must be between 0 and 1, got {alpha!r}")
    return float(alpha)


def _weight(model, node, inits):
    """(initializer of the constant weight, its input-channel axis) of a MatMul / Gemm, or None."""
    if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
        w = inits[node.input[1]]
        return (w, len(w.dims) - 2) if len(w.dims) >= 2 else None
    if node.op_type == "Gemm" and node.input[1] in inits:
        attrs = {a.name: a.i for a in node.attribute}
        if attrs.get("transA", 0):
            return None
        return inits[node.input[1]], 1 if attrs.get("transB", 0) else 0
    return None


def smoothed_nodes(model, nodes) -> list:
    """The NodeProtos of `nodes` SmoothQuant can rescale: MatMul / Gemm with a constant weight."""
    inits = {i.name: i for i in model.graph.initializer}
    wanted = set(nodes)
    return [n for n in model.graph.node if n.name in wanted and _weight(model, n, inits) is not None]


def channel_max(graph_path, names, feeds, work) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each named tensor of the graph at graph_path over feeds() (fresh
    feed dicts each call): each batch is reduced and dropped, and the tensors are fetched in groups of at
    most ranges.BUDGET bytes, as the range fit does (ranges.stream_outputs)."""
    from vdit_deploy.calibration.ranges import stream_outputs

    out: dict[str, np.ndarray] = {}

    def fold(first_pass, outputs):
        for name, a in outputs.items():
            m = np.abs(a.reshape(-1, a.shape[-1])).max(axis=0)
            out[name] = m if name not in out else np.maximum(out[name], m)

    stream_outputs(Path(graph_path), list(names), feeds, Path(work), fold)
    if not out:
        raise VditError("--smooth: the calibration set gave no batch for this graph")
    return out


def smooth_model(model, stats: dict, nodes, alpha: float):
    """Insert X / s before each of `nodes` (MatMul / Gemm with constant weights) and fold s into its
    weight; returns the model (changed in place). stats: channel_max of the nodes' inputs (their
    names: `{n.input[0] for n in smoothed_nodes(model, nodes)}`) on the calibration set."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    chosen = smoothed_nodes(model, nodes)
    if not chosen:
        return model
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for node in chosen:
        w_init, axis = _weight(model, node, inits)
        w = numpy_helper.to_array(w_init).astype(np.float32)
        x_max = stats[node.input[0]].astype(np.float64)
        w_max = np.abs(np.moveaxis(w, axis, -1)).reshape(-1, w.shape[axis]).max(axis=0).astype(np.float64)
        if x_max.shape != w_max.shape:
            continue      # not a channel-for-channel product (a broadcast MatMul): leave it as it is
        s = np.where((x_max > 0) & (w_max > 0), x_max ** alpha / np.maximum(w_max, 1e-12) ** (1 - alpha), 1.0)
        s = np.clip(s, 1e-4, 1e4).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        name = f"{node.name}.smooth"
        new_w = numpy_helper.from_array((w * s.reshape(shape)).astype(np.float32), f"{w_init.name}.smoothed.{node.name}")
        model.graph.initializer.append(new_w)
        model.graph.initializer.append(numpy_helper.from_array(1.0 / s, f"{name}.inv_scale"))
        uses[w_init.name] -= 1
        smoothed = f"{name}.x"
        mul = helper.make_node("Mul", [node.input[0], f"{name}.inv_scale"], [smoothed], name=f"{name}/mul")
        mul.metadata_props.extend(node.metadata_props)      # the same layer path (graph.node_path)
        position = list(model.graph.node).index(node)
        model.graph.node.insert(position, mul)
        node.input[0], node.input[1] = smoothed, new_w.name
    keep = [i for i in model.graph.initializer if uses.get(i.name, 1) > 0]   # replaced weights dropped
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model
