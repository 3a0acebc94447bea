"""INT8 beyond the fix on the tiny preset: per-timestep-bin Q/DQ scales (one file, a session per bin,
each call on its timestep's bin), SmoothQuant migration (the fp32 function kept), bad values refused."""
import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from vdit_deploy.calibration.collect import collect, load_calibration_set
from vdit_deploy.calibration.int8 import quantize_int8
from vdit_deploy.cli import main
from vdit_deploy.errors import VditError
from vdit_deploy.runtimes.qdq_bins import BINS_KEY, bin_of, read_bins


@pytest.fixture(scope="module")
def export(tiny_export, tmp_path_factory):
    return shutil.copytree(tiny_export, tmp_path_factory.mktemp("i8p") / "export")


@pytest.fixture(scope="module")
def calib(export, tmp_path_factory):
    # 6 DDIM steps, guidance 2, 3 recorded steps (t ~ 833, 500, 0): 6 rows
    return collect(export, tmp_path_factory.mktemp("i8p") / "set", sampler="ddim", steps=6, seeds=range(1),
                   labels=[1], timesteps=3)


@pytest.fixture(scope="module")
def binned(export, calib):
    # float_steps=0: every call on its bin (the first steps in float are tested below)
    return quantize_int8(export, calib, mode="qdq", method="minmax", t_bins=3, float_steps=0, out=export / "q-bins.onnx")


def test_bins_share_the_weights(binned, export, calib):
    model = onnx.load(str(binned))
    edges, tables = read_bins({p.key: p.value for p in model.metadata_props}, str(binned))
    cset = load_calibration_set(calib)
    ts = sorted(cset.manifest["timesteps"])
    assert len(tables) == 3 and len(edges) == 2 and ts[0] < edges[0] < ts[1] < edges[1] < ts[2]
    names = set(tables[0])
    assert names and all(set(t) == names for t in tables)
    # only activation scales (and zero points) differ per bin: one copy of the int8 weights in the file
    assert all(n.endswith(("_scale", "_zero_point")) for n in names)
    inits = {i.name: i for i in model.graph.initializer}
    weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert weights and not names & {w.name for w in weights}
    assert any(not np.array_equal(tables[0][n], numpy_helper.to_array(inits[n])) for n in names)
    single = quantize_int8(export, calib, mode="qdq", method="minmax", out=export / "q-one.onnx")
    assert abs(binned.stat().st_size - single.stat().st_size) < 64 * 1024   # the tables are small
    # a TensorRT build of the binned graph says it takes the file's own scales; of the single one, nothing
    from vdit_deploy.runtimes.qdq_bins import bins_note
    assert "fitted on every timestep" in bins_note({p.key: p.value for p in model.metadata_props}, binned.name)
    assert bins_note({p.key: p.value for p in onnx.load(str(single)).metadata_props}, single.name) is None


def test_first_steps_run_in_float(export, calib, binned, tmp_path):
    """--float-steps: calls at the calibration sampler's first timesteps run on the export's fp32 graph,
    the others on the INT8 graph; the default is 2 steps for qdq, none for dynamic."""
    import onnxruntime as ort

    from vdit_deploy.runtimes.ort_runtime import OrtRuntime
    from vdit_deploy.runtimes.qdq_bins import FLOAT_KEY, float_note, read_float_above
    from vdit_deploy.sampling import sampler_plan

    props = lambda p: {m.key: m.value for m in onnx.load(str(p), load_external_data=False).metadata_props}
    path = quantize_int8(export, calib, mode="qdq", out=export / "q-float.onnx")      # the default: 2
    cset = load_calibration_set(calib)
    ts = [float(s.t) for s in sampler_plan(cset.contract, "ddim", 6)]
    assert json.loads(props(path)[FLOAT_KEY]) == {"t": (ts[1] + ts[2]) / 2, "steps": 2, "sampler": "ddim", "of": 6}
    assert FLOAT_KEY not in props(quantize_int8(export, calib, mode="qdq", float_steps=0, out=export / "q-0.onnx"))
    assert FLOAT_KEY not in props(quantize_int8(export, calib, mode="dynamic", out=export / "d.onnx"))
    rt, fp32 = OrtRuntime(path, "int8-qdq", providers=["cpu"]), OrtRuntime(export, "fp32", providers=["cpu"])
    raw = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, *cset.contract.latent)).astype(np.float32)
    y = {"y": np.int32([1, 1])}
    for t, in_float in ((ts[0], True), (ts[1], True), (ts[2], False), (ts[-1], False)):
        got = rt.denoise(x, np.float32([t, t]), y)
        if in_float:
            assert np.array_equal(got, fp32.denoise(x, np.float32([t, t]), y))
        else:
            want = raw.run(["out"], {"x_t": x, "t": np.float32([t, t]), **y})[0]
            assert np.array_equal(got, want) and not np.allclose(got, fp32.denoise(x, np.float32([t, t]), y))
    # rows at both sides of the threshold in one call: each row on its graph (test_served_first_steps)
    mixed = rt.denoise(x, np.float32([ts[0], ts[-1]]), y)
    assert np.array_equal(mixed[:1], fp32.denoise(x[:1], np.float32([ts[0]]), {"y": y["y"][:1]}))
    assert "fp32 at t >=" in rt.describe() and export / "denoiser.onnx" in rt.files
    # `vdit info` shows the types, the first steps in float and (for a binned graph) the bins
    shown = CliRunner().invoke(main, ["info", str(path)]).output
    assert f"float at   t >= {(ts[1] + ts[2]) / 2:g} (the first 2 of 6 ddim steps)" in shown and "asymmetric" in shown
    assert "t bins     3 sets of activation scales" in CliRunner().invoke(main, ["info", str(binned)]).output
    # TensorRT and Triton run one graph for every step: they say so
    assert "TensorRT runs every step in INT8" in float_note(props(path), path.name, "TensorRT")
    assert float_note(props(export / "q-0.onnx"), "q-0.onnx", "TensorRT") is None
    # the graph alone, without the export's fp32 graph beside it: refused in one line
    alone = tmp_path / path.name
    shutil.copyfile(path, alone)
    with pytest.raises(VditError, match="needs the export's denoiser.onnx beside it"):
        OrtRuntime(alone, "int8-qdq", providers=["cpu"])
    for bad in ("[", '{"t": "high"}', '{"t": null}'):
        with pytest.raises(VditError, match=FLOAT_KEY):
            read_float_above({FLOAT_KEY: bad}, "g.onnx")


def test_served_first_steps(export, calib, tmp_path):
    """serve-export of a Q/DQ graph with its first steps in float: the python backend gets the fp32 graph
    beside it, and a batch of rows at several timesteps (Triton's batcher merges calls of different
    requests) runs each row on its graph; the onnxruntime backend runs every step in INT8 and says so."""
    import onnxruntime as ort

    from vdit_deploy.export.triton import write_triton_repo
    from vdit_deploy.runtimes.ort_runtime import OrtRuntime

    quantize_int8(export, calib, mode="qdq")
    write_triton_repo(export, tmp_path / "py", precision="int8-qdq", backend="python")
    version = tmp_path / "py" / "vdit_denoiser" / "1"
    assert (version / "denoiser.onnx").is_file()
    notes = write_triton_repo(export, tmp_path / "ort", precision="int8-qdq", backend="onnxruntime")
    assert not (tmp_path / "ort" / "vdit_denoiser" / "1" / "denoiser.onnx").exists()
    assert any("Triton's onnxruntime backend runs every step in INT8" in n for n in notes)
    rt = OrtRuntime(version / "model.onnx", "int8-qdq", providers=["cpu"])     # as the python backend opens it
    t = np.float32([999, 20, 999, 20])
    x = np.random.default_rng(1).standard_normal((4, *rt.contract.latent)).astype(np.float32)
    y = np.int32([0, 1, 2, 3])
    got = rt.denoise_rows(x, t, {"y": y})
    fp32 = OrtRuntime(export, "fp32", providers=["cpu"]).denoise(x[::2], t[::2], {"y": y[::2]})
    raw = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    int8 = raw.run(["out"], {"x_t": x[1::2], "t": t[1::2], "y": y[1::2]})[0]
    assert np.array_equal(got[::2], fp32) and np.array_equal(got[1::2], int8)


def test_runtime_picks_the_bin_of_each_timestep(binned, calib):
    import onnxruntime as ort

    from vdit_deploy.runtimes.ort_runtime import OrtRuntime

    rt = OrtRuntime(binned, providers=["cpu"])
    edges, sessions = rt.graph.bins
    cset = load_calibration_set(calib)
    _, tables = read_bins(rt.graph.session.get_modelmeta().custom_metadata_map, "")
    outs = []
    for r in cset.manifest["records"]:
        rows = cset.rows(*r["rows"])
        k = int(bin_of(r["t"], edges))
        assert rt.graph.session_for(rows["t"]) is sessions[k]
        # the bin's session is the file with the bin's initializers in place
        model = onnx.load(str(binned))
        for init in model.graph.initializer:
            if init.name in tables[k]:
                init.CopyFrom(numpy_helper.from_array(tables[k][init.name].astype(
                    numpy_helper.to_array(init).dtype), init.name))
        want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            ["out"], rows)[0]
        got = rt.denoise(rows["x_t"], rows["t"], {"y": rows["y"]})
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        outs.append(k)
    assert sorted(set(outs)) == [0, 1, 2]
    rows = cset.rows(0, 6)
    with pytest.raises(VditError, match="share a bin"):
        rt.denoise(rows["x_t"][:2], np.float32([rows["t"][0], rows["t"][-1]]), {"y": rows["y"][:2]})


def test_read_bins_refuses_bad_metadata():
    assert read_bins({}, "g") is None
    for bad in ["[", json.dumps({"edges": [5, 1], "tensors": {}}),
                json.dumps({"edges": [1], "tensors": {"a": {"dtype": "float32", "shape": [], "bins": [[1.0]]}}}),
                json.dumps({"edges": [1], "tensors": {"a": {"dtype": "object", "shape": [], "bins": [[1], [2]]}}})]:
        with pytest.raises(VditError) as e:
            read_bins({BINS_KEY: bad}, "g.onnx")
        assert "\n" not in str(e.value)


def test_smoothing_alone_keeps_the_function(export, calib):
    from vdit_deploy.calibration.collect import onnx_session
    from vdit_deploy.calibration.graph import COMPUTE_OPS, select
    from vdit_deploy.calibration.ranges import stream_outputs
    from vdit_deploy.calibration.smooth import channel_max, smooth_model, smoothed_nodes

    model = onnx.load(str(export / "denoiser.onnx"))
    cset = load_calibration_set(calib)
    nodes = select(model, ["MatMul"], COMPUTE_OPS)
    names = sorted({n.input[0] for n in smoothed_nodes(model, nodes)})
    feeds = lambda: cset.batches(1, 4)
    stats = channel_max(export / "denoiser.onnx", names, feeds, export.parent)
    # the same statistics fetched in groups of a few tensors (a budget below one batch's): bounded memory
    small = {}
    stream_outputs(export / "denoiser.onnx", names, feeds, export.parent,
                   lambda first, outs: small.update({k: np.maximum(small.get(k, 0), np.abs(
                       a.reshape(-1, a.shape[-1])).max(axis=0)) for k, a in outs.items()}), budget=1)
    assert small.keys() == stats.keys() and all(np.array_equal(small[k], stats[k]) for k in stats)
    smoothed = smooth_model(onnx.load(str(export / "denoiser.onnx")), stats, nodes, 0.5)
    muls = [n for n in smoothed.graph.node if n.name.endswith(".smooth/mul")]
    assert len(muls) >= 16                      # every linear of the 4 blocks
    path = export.parent / "smoothed.onnx"
    onnx.save(smoothed, str(path))
    rows = cset.rows(0, 4)
    want = onnx_session(export / "denoiser.onnx").run(["out"], rows)[0]
    got = onnx_session(path).run(["out"], rows)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


@pytest.mark.parametrize("args,message", [
    (["--mode", "qdq", "--t-bins", "0"], "--t-bins must be"),
    (["--mode", "qdq", "--smooth", "2"], "--smooth (SmoothQuant's alpha) must be between 0 and 1"),
    (["--mode", "qdq", "--t-bins", "4", "--calib", "CALIB"], "needs at least 4 recorded timesteps"),
    (["--t-bins", "2", "--calib", "CALIB"], "applies to the static Q/DQ graph"),
    (["--mode", "qdq", "--smooth", "0.5"], "--smooth needs a calibration set"),
    (["--mode", "qdq", "--smooth", "0.5", "--t-bins", "2", "--calib", "CALIB"], "--smooth with --t-bins"),
    (["--mode", "qdq", "--float-steps", "-1", "--calib", "CALIB"], "--float-steps must be a whole number"),
    (["--mode", "qdq", "--float-steps", "6", "--calib", "CALIB"], "leaves none of the calibration sampler's 6 steps"),
    (["--float-steps", "1"], "--float-steps needs a calibration set")])
def test_bad_values_are_one_line(export, calib, args, message):
    before = sorted(p.name for p in export.iterdir())
    args = [str(calib) if a == "CALIB" else a for a in args]
    result = CliRunner().invoke(main, ["calibrate", "int8", str(export), *args])
    assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in export.iterdir()) == before            # nothing half-written
