"""Dynamic INT8 one weight at a time (calibration/int8_dynamic.py): the same graph as onnxruntime's
quantize_dynamic, weights streamed from and to external data, and memory bounded by one weight."""
import shutil
import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import quantize_dynamic

from vdit_deploy.calibration import int8_dynamic
from vdit_deploy.calibration.graph import COMPUTE_OPS, select
from vdit_deploy.calibration.int8 import DEFAULT_SENSITIVE, drop_weight_shapes, quantize_int8
from vdit_deploy.calibration.int8_dynamic import quantize_dynamic_streaming
from vdit_deploy.runtimes.cpu_isa import ISAS, choose


def run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def reference(src, out, nodes, choice):
    """What onnxruntime.quantization makes of the same graph with the same choice (the weights' value_info
    dropped first, as quantize_int8 does for its Q/DQ graph: onnxruntime 1.27 .. 1.31.1 fail on it)."""
    model = onnx.load(str(src))
    drop_weight_shapes(model)
    src = out.with_name("reference-input.onnx")
    onnx.save(model, str(src))
    quantize_dynamic(src, out, op_types_to_quantize=list(COMPUTE_OPS), per_channel=True, nodes_to_quantize=nodes,
                     reduce_range=choice.reduce_range, weight_type=choice.quant_type("weight"),
                     extra_options={"MatMulConstBOnly": True})
    return out


def initializers(path) -> dict:
    return {t.name: numpy_helper.to_array(t, base_dir=str(path.parent)) for t in onnx.load(str(path)).graph.initializer}


def toy_graph(path, width=64, blocks=2, seed=0, external=False):
    """x (N, 4, 8, 8) -> Conv(bias) -> (N, 8, 64) -> `blocks` x [two MatMuls reading one activation, the
    second weight shared with the next block] -> out. Every node is named, as the exporter names them."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), f"w{len(inits)}")
    inits, nodes = [], []
    inits.append(w(8, 4, 3, 3))
    inits.append(w(8))
    nodes.append(helper.make_node("Conv", ["x", "w0", "w1"], ["c"], "conv", pads=[1, 1, 1, 1]))
    inits.append(numpy_helper.from_array(np.array([0, 8, 64], np.int64), "shape"))
    nodes.append(helper.make_node("Reshape", ["c", "shape"], ["h0"], "reshape"))
    if width != 64:
        inits.append(w(64, width))
        nodes.append(helper.make_node("MatMul", ["h0", inits[-1].name], ["h0w"], "widen"))
    h = "h0w" if width != 64 else "h0"
    shared = None
    for b in range(blocks):
        first = w(width, width)
        inits.append(first)
        if shared is None:
            shared = w(width, width)
            inits.append(shared)
        nodes += [helper.make_node("MatMul", [h, first.name], [f"a{b}"], f"block{b}.a"),
                  helper.make_node("MatMul", [h, shared.name], [f"b{b}"], f"block{b}.b"),    # same activation
                  helper.make_node("Add", [f"a{b}", f"b{b}"], [f"s{b}"], f"block{b}.add"),
                  helper.make_node("Tanh", [f"s{b}"], [f"h{b + 1}"], f"block{b}.tanh")]
        h = f"h{b + 1}"
    nodes.append(helper.make_node("Identity", [h], ["out"], "out"))
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path), save_as_external_data=external, location=path.name + ".data", size_threshold=0)
    return path, [n.name for n in nodes if n.op_type in ("MatMul", "Conv")]


@pytest.mark.parametrize("target", ISAS)
def test_toy_graph_equals_onnxruntime(tmp_path, target):
    """Conv (per-tensor, bias re-added), a shared activation and a shared weight: the same int8 values,
    scales and zero points under the same names, and the same outputs, bit for bit."""
    choice = choose("dynamic", target)
    src, nodes = toy_graph(tmp_path / "toy.onnx")
    model, data = quantize_dynamic_streaming(src, tmp_path / "mine.onnx", nodes, choice)
    assert data is None                                   # small: the tensors stay inside the .onnx
    onnx.save(model, str(tmp_path / "mine.onnx"))
    ref = reference(src, tmp_path / "ref.onnx", nodes, choice)
    mine, theirs = initializers(tmp_path / "mine.onnx"), initializers(ref)
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert mine[name].dtype == theirs[name].dtype and np.array_equal(mine[name], theirs[name]), name
    ops = lambda m: sorted(n.op_type for n in m.graph.node)
    assert ops(model) == ops(onnx.load(str(ref)))
    assert sum(n.op_type == "DynamicQuantizeLinear" for n in model.graph.node) == 3   # x, h0, h1: one each
    x = np.random.default_rng(1).standard_normal((3, 4, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(tmp_path / "mine.onnx", {"x": x}), run(ref, {"x": x}))


@pytest.mark.parametrize("target", ["avx2", "vnni"])
def test_shipped_model_equals_onnxruntime(tiny_export, tmp_path, target):
    """The built-in model's denoiser with the default rules: what `vdit calibrate int8` writes equals
    onnxruntime's quantize_dynamic output (its Gemms, left float, it rewrites to MatMul + Add)."""
    export = shutil.copytree(tiny_export, tmp_path / "export")
    src = export / "denoiser.onnx"
    model = onnx.load(str(src))
    excluded = set(select(model, DEFAULT_SENSITIVE, COMPUTE_OPS))
    nodes = [n for n in select(model, list(COMPUTE_OPS), COMPUTE_OPS) if n not in excluded]
    mine = quantize_int8(export, target=target)
    ref = reference(src, tmp_path / "ref.onnx", nodes, choose("dynamic", target))
    ours, theirs = initializers(mine), initializers(ref)
    quantized = [k for k in ours if k.endswith(("_quantized", "_scale", "_zero_point"))]
    assert quantized and all(np.array_equal(ours[k], theirs[k]) for k in quantized)
    rng = np.random.default_rng(0)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    kinds = {i.name: i.type for i in ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()}
    feeds = {"x_t": rng.standard_normal((2, *dims), dtype=np.float32),
             "t": np.array([900, 20], np.float32 if kinds["t"] == "tensor(float)" else np.int64),
             "y": np.array([1, 3], np.int64 if kinds["y"] == "tensor(int64)" else np.int32)}
    a, b = run(mine, feeds), run(ref, feeds)
    assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()


def test_external_data_in_and_out(tmp_path, monkeypatch):
    """Weights read from <graph>.data, and (past STREAM_ABOVE, here lowered) written to <out>.data
    beside the graph: the same outputs as the inline graph."""
    choice = choose("dynamic", "avx2")
    src, nodes = toy_graph(tmp_path / "toy.onnx", external=True)
    assert (tmp_path / "toy.onnx.data").is_file()
    inline, _ = quantize_dynamic_streaming(src, tmp_path / "inline.onnx", nodes, choice)
    onnx.save(inline, str(tmp_path / "inline.onnx"))
    monkeypatch.setattr(int8_dynamic, "STREAM_ABOVE", 1024)
    model, data = quantize_dynamic_streaming(src, tmp_path / "big.onnx", nodes, choice)
    assert data == tmp_path / "big.onnx.data" and data.stat().st_size > 0
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"big.onnx.data"}
    onnx.save(model, str(tmp_path / "big.onnx"))
    x = np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(tmp_path / "big.onnx", {"x": x}), run(tmp_path / "inline.onnx", {"x": x}))


def test_memory_is_about_one_weight(tmp_path, monkeypatch):
    """32 fp32 weights of 2 MB (64 MB) quantized into external data: the Python-side peak (numpy arrays,
    tracemalloc) stays near one weight, where onnxruntime's quantize_dynamic holds them all."""
    src, nodes = toy_graph(tmp_path / "wide.onnx", width=724, blocks=31, external=True)   # 724^2 * 4 B ~ 2 MB
    weight = 724 * 724 * 4
    monkeypatch.setattr(int8_dynamic, "STREAM_ABOVE", 1024)
    tracemalloc.start()
    try:
        quantize_dynamic_streaming(src, tmp_path / "q.onnx", nodes, choose("dynamic", "avx2"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = (tmp_path / "wide.onnx.data").stat().st_size
    assert total > 30 * weight
    assert peak < 4 * weight, f"peak {peak / 2**20:.1f} MB for {weight / 2**20:.1f} MB weights ({total / 2**20:.0f} MB in all)"
