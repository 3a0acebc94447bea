"""Dynamic INT8 one weight at a time: the graph onnxruntime's quantize_dynamic makes, without holding the model.

quantize_dynamic loads the fp32 graph with its weights, a shape-inferred copy and the quantized weights
together: 3.5x the fp32 weights at its peak (20 GB, OOM-killed, for Wan 2.1 1.3B's 5.7 GB). Here the graph
is read without its weights; each quantized weight is read from its file, quantized with onnxruntime's
own per-channel arithmetic (quant_utils.quantize_data, so the int8 values and scales are the same) and
written out before the next is read. Peak: the graph's structure + one fp32 weight, and the output's
tensors only when they are small enough (STREAM_ABOVE) to stay inside the .onnx; larger outputs keep
them in <out>.onnx.data.

What each quantized node becomes (onnxruntime.quantization.operators.matmul.MatMulInteger / conv.ConvInteger):
    A -> DynamicQuantizeLinear -> A_q (u8), A_scale, A_zp      one per activation, shared by its consumers
    MatMulInteger(A_q, W_q, A_zp, W_zp) -> int32 -> Cast -> * (A_scale * W_scale) -> the node's output
    ConvInteger the same way with per-tensor weights, then + bias (reshaped to (1, C, 1...))
ONNX Runtime fuses the MatMul chain into one DynamicQuantizeMatMul kernel when it loads the graph.
MatMul weights are per output channel (W_scale: (N,)) when per_channel, Conv weights per tensor: what
quantize_dynamic does. Gemm has no integer form there and stays float.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.export.graph_files import check_external_data
from vdit_deploy.runtimes.cpu_isa import Int8Choice

INTEGER_OPS = ("MatMul", "Conv")      # quantize_dynamic's IntegerOps: Gemm has no integer kernel form
CHUNK = 64 << 20                      # bytes copied at a time between data files
STREAM_ABOVE = 256 << 20             # an output with more tensor bytes keeps them in <out>.data, written one
                                      # at a time and never held (protobuf's own limit is 2 GB)
INLINE_BELOW = 1024                   # smaller tensors stay in the .onnx, as onnx.save's size_threshold
                                      # (ONNX Runtime reads shape tensors, Reshape's, only from there)


class TensorSource:
    """The bytes of a graph's initializers, each read when asked: inline ones from the proto, external
    ones from <graph>.data (its locations checked first, export/graph_files.py)."""

    def __init__(self, model, path: Path):
        check_external_data(model, path)
        self.data_path = path.with_name(path.name + ".data")

    @staticmethod
    def _external(t):
        from onnx.external_data_helper import uses_external_data

        if not uses_external_data(t):
            return None
        info = {e.key: e.value for e in t.external_data}
        return int(info.get("offset", 0)), int(info["length"])

    def array(self, t) -> np.ndarray:
        from onnx import helper, numpy_helper

        where = self._external(t)
        if where is None:
            return numpy_helper.to_array(t)
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        offset, length = where
        return np.fromfile(self.data_path, dtype=dtype, count=length // dtype.itemsize, offset=offset).reshape(t.dims)

    def inline(self, t):
        """t with its data inside the proto (read from the data file if it is external)."""
        from onnx import numpy_helper

        return t if self._external(t) is None else numpy_helper.from_array(self.array(t), t.name)

    def copy_bytes(self, t, out) -> None:
        """Write the tensor's raw little-endian bytes to the file `out`, CHUNK at a time."""
        where = self._external(t)
        if where is None:
            out.write(self.array(t).tobytes())
            return
        offset, length = where
        with open(self.data_path, "rb") as f:
            f.seek(offset)
            while length > 0:
                chunk = f.read(min(CHUNK, length))
                if not chunk:
                    raise VditError(f"{self.data_path}: ends before tensor {t.name[:60]!r} does")
                out.write(chunk)
                length -= len(chunk)


class TensorSink:
    """The output graph's initializers: inline in the proto, or appended to one external data file
    (`location`: its name beside the graph) as they come, past STREAM_ABOVE."""

    def __init__(self, data_file: Path | None, location: str):
        self.location, self.file = location, (open(data_file, "wb") if data_file else None)

    def _external(self, name: str, data_type: int, dims, write):
        """A tensor whose bytes write(file) appends to the data file."""
        from onnx import TensorProto

        t = TensorProto(name=name, data_type=data_type, dims=list(dims), data_location=TensorProto.EXTERNAL)
        offset = self.file.tell()
        write(self.file)
        for key, value in (("location", self.location), ("offset", str(offset)),
                           ("length", str(self.file.tell() - offset))):
            t.external_data.add(key=key, value=value)
        return t

    def array(self, name: str, a: np.ndarray):
        from onnx import helper, numpy_helper

        if self.file is None or a.nbytes < INLINE_BELOW:
            return numpy_helper.from_array(a, name)
        little = np.ascontiguousarray(a, a.dtype.newbyteorder("<"))
        return self._external(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape, lambda f: f.write(little.tobytes()))

    def copy(self, t, source: TensorSource):
        """An initializer kept as it is (its bytes copied, not decoded)."""
        from onnx import helper

        nbytes = int(np.prod(t.dims)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if self.file is None or nbytes < INLINE_BELOW:
            return source.inline(t)
        return self._external(t.name, t.data_type, t.dims, lambda f: source.copy_bytes(t, f))

    def close(self):
        if self.file:
            self.file.close()


def quantize_weight(w: np.ndarray, choice: Int8Choice, per_channel: bool):
    """w (K, N) per output channel, or any shape per tensor -> (w_q, scale, zero_point) exactly as
    onnxruntime.quantization (base_quantizer.quantize_weight_per_channel_impl / quantize_initializer_impl):
    symmetric for int8, asymmetric for uint8, reduce_range as the choice says."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    qtype = TensorProto.INT8 if choice.weight_type == "int8" else TensorProto.UINT8
    symmetric = choice.weight_type == "int8"
    if not per_channel:
        zp, scale, q = quantize_data(w.flatten(), qtype, symmetric, reduce_range=choice.reduce_range)
        return np.asarray(q).reshape(w.shape), np.asarray(scale, np.float32), np.asarray(zp)
    channels = [quantize_data(w[:, n].flatten(), qtype, symmetric, reduce_range=choice.reduce_range)
                for n in range(w.shape[1])]                      # one (zp, scale, q) per column of (K, N)
    q = np.stack([np.asarray(c[2]) for c in channels], axis=1)    # (K, N)
    scale = np.array([c[1] for c in channels], np.float32)        # (N,)
    zp = np.array([c[0] for c in channels], dtype=q.dtype)        # (N,)
    return q, scale, zp


def output_bytes(model, nodes: set[str]) -> int:
    """The output graph's initializer bytes, from dims alone: quantized weights at one byte per value."""
    from onnx import helper

    quantized = {n.input[1] for n in model.graph.node if n.name in nodes}
    total = 0
    for t in model.graph.initializer:
        count = int(np.prod(t.dims)) if t.dims else 1
        itemsize = 1 if t.name in quantized else helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += count * itemsize
    return total


def quantizable(model, names) -> set[str]:
    """The nodes of `names` quantize_dynamic rewrites: MatMul / Conv whose weight (input 1) is an
    initializer (MatMulConstBOnly) and whose input 0 is not; MatMul weights 2-D (K, N)."""
    inits = {t.name: t for t in model.graph.initializer}
    names = set(names)
    return {n.name for n in model.graph.node
            if n.name in names and n.op_type in INTEGER_OPS and len(n.input) > 1
            and n.input[1] in inits and n.input[0] not in inits
            and (n.op_type == "Conv" or len(inits[n.input[1]].dims) == 2)}


def quantize_dynamic_streaming(src: Path, out: Path, nodes, choice: Int8Choice, per_channel: bool = True,
                               progress: bool = False):
    """src (an fp32 graph file, weights inline or in src.data) -> the dynamic INT8 ModelProto for `out`.
    Its large tensors, if any, are already written to out.data (`location` out.name + ".data"); the
    caller writes the proto beside it. Returns (model, data_file or None)."""
    import onnx
    from onnx import TensorProto, helper

    from vdit_deploy.progress import bar

    model = onnx.load(str(src), load_external_data=False)
    source = TensorSource(model, Path(src))
    chosen = quantizable(model, nodes)
    if not chosen:
        raise VditError("no layer is left to quantize (check --keep-fp / the layer patterns)")
    if not any(o.domain in ("", "ai.onnx") and o.version >= 11 for o in model.opset_import):
        raise VditError(f"{Path(src).name}: dynamic INT8 needs opset >= 11 (DynamicQuantizeLinear)")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | \
        {i.name for i in graph.input}
    # fp32 weights still read by a node left in float are kept beside their int8 copies
    float_uses = {i for n in graph.node if n.name not in chosen for i in n.input}
    data_file = out.with_name(out.name + ".data") if output_bytes(model, chosen) > STREAM_ABOVE else None
    sink = TensorSink(data_file, out.name + ".data")

    def fresh(name):
        if name in taken:
            raise VditError(f"cannot quantize: the graph already has a tensor named {name[:60]!r}")
        taken.add(name)
        return name

    activations: dict[str, tuple[str, str, str]] = {}        # A -> (A_q, A_scale, A_zp)
    weights: dict[str, tuple[str, str, str]] = {}             # W -> (W_q, W_scale, W_zp)
    new_inits, new_nodes = [], []
    try:
        for node in bar(graph.node, show=progress, desc=f"int8 {Path(src).name}", unit="node"):
            if node.name not in chosen:
                new_nodes.append(node)
                continue
            a, w = node.input[0], node.input[1]
            if a not in activations:
                activations[a] = (fresh(a + "_quantized"), fresh(a + "_scale"), fresh(a + "_zero_point"))
                new_nodes.append(helper.make_node("DynamicQuantizeLinear", [a], list(activations[a]),
                                                  fresh(a + "_QuantizeLinear")))
            if w not in weights:
                matmul = node.op_type == "MatMul"
                q, scale, zp = quantize_weight(source.array(inits[w]), choice, per_channel and matmul)
                weights[w] = (fresh(w + "_quantized"), fresh(w + "_scale"), fresh(w + "_zero_point"))
                new_inits += [sink.array(weights[w][0], q), sink.array(weights[w][1], scale),
                              sink.array(weights[w][2], zp)]
            (a_q, a_s, a_zp), (w_q, w_s, w_zp) = activations[a], weights[w]
            base = node.name or node.output[0]
            integer_out = fresh(node.output[0] + "_output_quantized")
            kwargs = {at.name: helper.get_attribute_value(at) for at in node.attribute}
            integer = helper.make_node(f"{node.op_type}Integer", [a_q, w_q, a_zp, w_zp], [integer_out],
                                       fresh(base + "_quant"), **kwargs)
            integer.metadata_props.extend(node.metadata_props)   # layer paths stay readable (graph.py)
            cast = helper.make_node("Cast", [integer_out], [fresh(integer_out + "_cast_output")],
                                    fresh(integer_out + "_cast"), to=TensorProto.FLOAT)
            scales = helper.make_node("Mul", [a_s, w_s], [fresh(base + "_quant_scales_mul:0")],
                                      fresh(base + "_quant_scales_mul"))
            has_bias = node.op_type == "Conv" and len(node.input) == 3 and node.input[2]
            scaled = fresh(node.output[0] + "quant_scaled_output") if has_bias else node.output[0]
            new_nodes += [integer, cast, scales,
                          helper.make_node("Mul", [cast.output[0], scales.output[0]], [scaled],
                                           fresh(base + "_quant_output_scale_mul"))]
            if has_bias:        # ConvInteger has no bias: add it back, broadcast over (B, C, spatial...)
                shape = np.ones(len(inits[w].dims), np.int64)
                shape[1] = -1
                shape_name = fresh(node.output[0] + "_bias_reshape_shape")
                new_inits.append(sink.array(shape_name, shape))
                reshaped = fresh(node.output[0] + "_bias_reshape_output")
                new_nodes += [helper.make_node("Reshape", [node.input[2], shape_name], [reshaped]),
                              helper.make_node("Add", [scaled, reshaped], [node.output[0]],
                                               fresh(node.output[0] + "_bias_add"))]
        kept = [t for t in graph.initializer if t.name not in weights or t.name in float_uses]
        new_inits = [sink.copy(t, source) for t in kept] + new_inits
    finally:
        sink.close()
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    return model, data_file

