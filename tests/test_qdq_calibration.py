"""Static Q/DQ calibration in bounded memory (calibration/ranges.py) and a variant's graphs published
together (calibration/fp16.publish_files), on the tiny random export."""
import gc
import os
import shutil
import weakref

import numpy as np
import onnx
import pytest

from vdit_deploy.calibration.collect import collect, load_calibration_set
from vdit_deploy.calibration.fp16 import publish_files
from vdit_deploy.calibration.graph import COMPUTE_OPS, select
from vdit_deploy.calibration.int8 import DEFAULT_SENSITIVE, quantize_int8
from vdit_deploy.calibration.ranges import calibration_tensors, fit_ranges, groups, tensor_bytes
from vdit_deploy.errors import VditError
from vdit_deploy.runtimes import open_runtime


@pytest.fixture(scope="module")
def export(tiny_export, tmp_path_factory):
    return shutil.copytree(tiny_export, tmp_path_factory.mktemp("qdq") / "export")


@pytest.fixture(scope="module")
def calib(export, tmp_path_factory):
    # 4 DDIM steps, guidance 2, 3 recorded steps: 3 calls of 2 rows
    return collect(export, tmp_path_factory.mktemp("qdq") / "set", sampler="ddim", steps=4, seeds=range(1),
                   labels=[1], timesteps=3)


def quantized_nodes(model):
    kept = set(select(model, DEFAULT_SENSITIVE, COMPUTE_OPS))
    return [n for n in select(model, [*COMPUTE_OPS], COMPUTE_OPS) if n not in kept]


def test_only_the_tensors_qdq_quantizes_are_calibrated(export):
    """Not onnxruntime's every input/output of every MatMul: attention's QK^T scores and the layers kept
    in float have no range fitted (the scores are the largest activations of a video DiT)."""
    model = onnx.load(str(export / "denoiser.onnx"))
    nodes = quantized_nodes(model)
    tensors = calibration_tensors(model, nodes)
    by_name = {n.name: n for n in model.graph.node}
    touched = {t for n in nodes for t in (*by_name[n].input, *by_name[n].output)}
    weights = {i.name for i in model.graph.initializer}
    assert set(tensors) == touched - weights - {""}
    attention = set(select(model, ["scaled_dot_product_attention"], COMPUTE_OPS))
    scores = {by_name[n].output[0] for n in attention}
    assert attention and not scores & set(tensors)


def test_calibration_holds_one_batch_at_a_time(export, calib, tmp_path):
    """Each feed is drawn only after the one before it was folded in and dropped (a regression to
    listing the reader's batches, or to keeping each batch's outputs, keeps them alive), and the
    ranges equal onnxruntime's own MinMax calibrator's on the same batches."""
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    from vdit_deploy.export.metadata import read_metadata

    cset = load_calibration_set(calib)
    src = export / "denoiser.onnx"
    lo, hi = read_metadata(src).batch_range()
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(onnx.load(str(src)), str(fp32), save_as_external_data=True, location="fp32.onnx.data")
    alive, drawn = [], []

    def feeds():
        for b in cset.batches(lo, 1):          # 1-row batches: 6 of them
            gc.collect()
            assert not [r for r in alive if r() is not None], f"batch {len(drawn)} still held when the next is drawn"
            feed = {k: np.array(a) for k, a in b.items()}       # fresh arrays this test can watch
            alive.extend(weakref.ref(a) for a in feed.values())
            drawn.append(len(feed["t"]))
            yield feed
            del feed

    nodes = quantized_nodes(onnx.load(str(src), load_external_data=False))
    ranges, collector = fit_ranges(fp32, nodes, feeds, "minmax", tmp_path)
    tensors = calibration_tensors(onnx.load(str(src), load_external_data=False), nodes)
    assert len(drawn) == collector.batches == 6
    model = onnx.load(str(src), load_external_data=False)
    one = {k: np.asarray(a) for k, a in next(iter(cset.batches(lo, 1))).items()}
    sizes = tensor_bytes(model, tensors, one)
    assert collector.held == sum(sizes.values())        # one batch's calibrated tensors, never more
    # a budget below one batch's activations: one run per group that fits, the same ranges
    budget = sum(sizes.values()) // 3
    small, grouped = fit_ranges(fp32, nodes, lambda: (dict(b) for b in cset.batches(lo, 1)), "minmax", tmp_path, budget)
    assert len(groups(tensors, sizes, budget)) >= 3 and grouped.held <= max(budget, max(sizes.values()))
    for name in tensors:
        np.testing.assert_array_equal(np.ravel(small[name].range_value), np.ravel(ranges[name].range_value))
    assert not list(tmp_path.glob("augmented.onnx.data"))   # the augmented graph shares the fp32 weights

    class Reader:
        def __init__(self):
            self.it = cset.batches(lo, 1)

        def get_next(self):
            return next(self.it, None)

    # symmetric (TensorRT's) and [min, max] (a CPU's u8 activations): onnxruntime's own calibrator's ranges
    asymmetric, _ = fit_ranges(fp32, nodes, feeds, "minmax", tmp_path, symmetric=False)
    for symmetric, ours in ((True, ranges), (False, asymmetric)):
        ort_cal = MinMaxCalibrater(str(fp32), list(COMPUTE_OPS), str(tmp_path / f"ort-aug-{symmetric}.onnx"),
                                   symmetric=symmetric)
        ort_cal.augment_graph()
        ort_cal.create_inference_session()
        ort_cal.collect_data(Reader())
        theirs = ort_cal.compute_data()
        for name in tensors:
            np.testing.assert_allclose(np.ravel(ours[name].range_value), np.ravel(theirs[name].range_value), rtol=1e-6)
    assert any(float(asymmetric[n].range_value[0]) != -float(asymmetric[n].range_value[1]) for n in tensors)


def test_qdq_pair_is_whole_or_refused(export, calib):
    """calibrate int8 --mode qdq writes denoiser + step.int8-qdq.onnx; a denoiser graph left without its
    step graph is refused by the runtime rather than sampled with the host-side step."""
    path = quantize_int8(export, calib, mode="qdq", method="minmax")
    step = export / "step.int8-qdq.onnx"
    assert path.is_file() and step.is_file()
    assert not [p for p in export.iterdir() if p.name.startswith(".")]      # no scratch left behind
    moved = step.rename(export / "step.int8-qdq.onnx.aside")
    try:
        with pytest.raises(VditError, match="without step.int8-qdq.onnx"):
            open_runtime("ort", export, precision="int8-qdq")
    finally:
        moved.rename(step)


@pytest.mark.parametrize("earlier", [True, False], ids=["replacing", "new"])
def test_failed_second_rename_keeps_the_earlier_pair(tmp_path, monkeypatch, earlier):
    """publish_files renames the step graph first, the denoiser last; if the denoiser's rename fails the
    step graph it replaced comes back (or the new one goes): never a new step beside an old denoiser."""
    out, tmp = tmp_path / "export", tmp_path / "scratch"
    out.mkdir(), tmp.mkdir()
    paths = [out / "denoiser.int8-qdq.onnx", out / "step.int8-qdq.onnx"]
    for p in paths:
        if earlier:
            p.write_text(f"old {p.name}")
        (tmp / p.name).write_text(f"new {p.name}")
    real = os.replace

    def replace(a, b):
        if str(b).endswith("denoiser.int8-qdq.onnx") and str(a).startswith(str(tmp)) and "replaced" not in str(a):
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        publish_files(tmp, paths)
    monkeypatch.undo()
    if earlier:
        assert [p.read_text() for p in paths] == [f"old {p.name}" for p in paths]
    else:
        assert not any(p.exists() for p in paths)
    for p in paths:
        (tmp / p.name).write_text(f"new {p.name}")
    publish_files(tmp, paths)         # and a working rename places both
    assert [p.read_text() for p in paths] == [f"new {p.name}" for p in paths]


def test_step_graph_without_shapes_is_fetched_within_the_budget(export, calib, tmp_path):
    """step.onnx is composed and carries no value_info: its sizes come from shape inference, so a budget
    below one batch's activations still splits the fetches (before, every tensor came out in one run)."""
    from vdit_deploy.export.metadata import read_metadata

    cset = load_calibration_set(calib)
    src = export / "step.onnx"
    model = onnx.load(str(src), load_external_data=False)
    assert not model.graph.value_info
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(onnx.load(str(src)), str(fp32), save_as_external_data=True, location="fp32.onnx.data")
    names = [i.name for i in model.graph.input]
    lo, _ = read_metadata(export / "denoiser.onnx").batch_range()
    nodes = quantized_nodes(model)
    tensors = calibration_tensors(model, nodes)
    first = {k: np.asarray(a) for k, a in next(iter(cset.step_batches(lo, 1, names))).items()}
    sizes = tensor_bytes(model, tensors, first)
    assert min(sizes.values()) > 0
    whole, _ = fit_ranges(fp32, nodes, lambda: cset.step_batches(lo, 1, names), "minmax", tmp_path)
    budget = sum(sizes.values()) // 4
    split, collector = fit_ranges(fp32, nodes, lambda: cset.step_batches(lo, 1, names), "minmax", tmp_path, budget)
    assert collector.held <= max(budget, max(sizes.values()))
    for name in tensors:
        np.testing.assert_array_equal(np.ravel(split[name].range_value), np.ravel(whole[name].range_value))
