"""Calibration sets, fp16 / INT8 graphs, sensitivity and the accuracy report on the tiny preset.

The tiny_checkpoint fixture is random (adaLN-Zero perturbed): these tests check the mechanics and
loose error bounds; the accuracy targets on the shipped checkpoint live in benchmarks/bench_int8.py
and `vdit calibrate report`."""
import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from vdit_deploy.calibration.collect import collect, load_calibration_set, pick_steps, run_onnx
from vdit_deploy.calibration.fp16 import FP32_OPS, check_fp16, convert_fp16
from vdit_deploy.calibration.int8 import quantize_int8
from vdit_deploy.checkpoint import read_info
from vdit_deploy.cli import main
from vdit_deploy.errors import VditError
from vdit_deploy.metrics import rel_l2

from conftest import trt_skip_reason


@pytest.fixture(scope="module")
def export(tiny_export, tmp_path_factory):
    """A private copy: the variants written here must not show up in other tests' export."""
    return shutil.copytree(tiny_export, tmp_path_factory.mktemp("calib") / "export")


@pytest.fixture(scope="module")
def calib(export, tmp_path_factory):
    # 6 DDIM steps, guidance 2 (2B = 2 rows per call), 3 recorded steps: 6 rows
    return collect(export, tmp_path_factory.mktemp("calib") / "set", sampler="ddim", steps=6, seeds=range(1),
                   labels=[1], timesteps=3)


@pytest.fixture(scope="module")
def reference(export, calib):
    return run_onnx(export / "denoiser.onnx", load_calibration_set(calib))


def test_pick_steps_spans_the_trajectory():
    assert pick_steps(50, 8) == [0, 7, 14, 21, 28, 35, 42, 49]
    assert pick_steps(5, 1) == [0]
    with pytest.raises(VditError, match="timesteps"):
        pick_steps(5, 6)


def test_collect_writes_manifest(calib, tiny_checkpoint):
    m = json.loads((calib / "manifest.json").read_text())
    assert m["checkpoint_sha256"] == read_info(tiny_checkpoint).sha256()
    assert m["sampler"] == "ddim" and m["steps"] == 6 and m["guidance"] == 2.0 and m["seeds"] == [0]
    assert m["step_indices"] == [0, 2, 5]                      # first, middle, last step
    assert m["timesteps"][0] > 800 and m["timesteps"][-1] == 0  # from near T down to 0
    assert m["shapes"] == {"x_t": [6, 3, 8, 16, 16], "t": [6], "y": [6]}
    assert m["contract"]["cond"][0]["name"] == "y" and m["labels"] == [1]
    # each call's 2B batch: the cond row, then the null row
    assert [(r["rows"], r["null_rows"]) for r in m["records"]] == [([0, 2], [1, 2]), ([2, 4], [3, 4]), ([4, 6], [5, 6])]
    cset = load_calibration_set(calib)
    assert cset.arrays["y"].tolist() == [1, 4] * 3             # cond label and the null label (guidance)
    assert [len(b["t"]) for b in cset.batches()] == [2, 2, 2]


def test_collect_from_checkpoint(tiny_checkpoint, tmp_path):
    path = collect(tiny_checkpoint, tmp_path / "set", steps=3, seeds=[5], labels=[0, 2], guidance=1.0, timesteps=2)
    m = json.loads((path / "manifest.json").read_text())
    assert m["runtime"] == "torch:fp32" and m["call_batch"] == 2 and m["shapes"]["x_t"][0] == 4
    assert m["checkpoint_sha256"] == read_info(tiny_checkpoint).sha256()


def test_foreign_set_is_refused(calib, export, tmp_path):
    from dataclasses import replace

    from vdit_deploy.export.metadata import read_metadata

    contract = read_metadata(export / "denoiser.onnx").contract
    assert load_calibration_set(calib, expect_contract=contract).contract == contract
    with pytest.raises(VditError, match="another model contract") as e:
        load_calibration_set(calib, expect_contract=replace(contract, latent=(3, 4, 16, 16)))
    assert "\n" not in str(e.value)
    foreign = shutil.copytree(calib, tmp_path / "foreign")
    m = json.loads((foreign / "manifest.json").read_text())
    m["checkpoint_sha256"] = "f" * 64
    (foreign / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(VditError, match="recorded with checkpoint") as e:
        quantize_int8(export, foreign, mode="qdq")
    assert "\n" not in str(e.value)
    result = CliRunner().invoke(main, ["calibrate", "int8", str(export), "--calib", str(foreign)])
    assert result.exit_code == 1 and result.output.startswith("Error: calibration set")
    assert not (export / "denoiser.int8-dynamic.onnx").exists()


def test_fp16_keeps_float_io_and_blocked_ops(export, calib, reference):
    path = convert_fp16(export, calib)
    model = onnx.load(str(path))   # the converter records every tensor's new type in value_info
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert all(v.type.tensor_type.elem_type == f32 for v in [*model.graph.input[:2], *model.graph.output])
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    blocked = [n for n in model.graph.node if n.op_type in FP32_OPS]
    assert {"LayerNormalization", "Softmax", "Sin", "Cos"} <= {n.op_type for n in blocked}
    assert all(types.get(o, f32) == f32 for n in blocked for o in n.output)
    assert sum(i.data_type == f16 for i in model.graph.initializer) > 10      # the weights did become fp16
    report = check_fp16(export, calib)
    assert report["nonfinite"] == 0 and report["rows"] == 6
    assert 0 < report["eps_rel_l2"] < 5e-3
    assert set(report["eps_rel_l2_per_t"]) == set(json.loads((calib / "manifest.json").read_text())["timesteps"])
    # a blocked op reads fp32 straight from the blocked op before it: no fp32 -> fp16 -> fp32 round trip
    producer = {o: n for n in model.graph.node for o in n.output}
    sin = next(n for n in model.graph.node if n.op_type == "Sin")
    assert producer[sin.input[0]].op_type == "Mul"                      # the angle t * freq, not a Cast


def test_fp16_step_keeps_its_arithmetic_fp32(export):
    from vdit_deploy.calibration.graph import step_nodes

    convert_fp16(export)
    model = onnx.load(str(export / "step.fp16.onnx"))
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert all(v.type.tensor_type.elem_type in (f32, onnx.TensorProto.INT32) for v in [*model.graph.input, *model.graph.output])
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    own = [n for n in model.graph.node if n.name in set(step_nodes(model))]
    assert {"Min", "Max", "Div"} <= {n.op_type for n in own}            # clip and the eps re-derivation
    assert not [o for n in own for o in n.output if types.get(o) == f16]   # (Shape / Expand of y are int)
    assert sum(i.data_type == f16 for i in model.graph.initializer) > 10
    onnx.checker.check_model(str(export / "step.fp16.onnx"), full_check=True)   # also: topologically sorted


@pytest.mark.parametrize("precision,tol", [("fp16", 1e-3), ("int8-qdq", 1e-2)])
def test_fused_step_equals_host_step(export, calib, precision, tol):
    """step.<precision>.onnx is what TensorRT builds and what ONNX Runtime runs: it must be the same
    precision's denoiser plus the fp32 host update, on trajectory inputs, deterministic and noisy steps."""
    from vdit_deploy.samplers import guided_step, make_steps
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.runtimes.trt_network import onnx_for

    if precision == "fp16":
        convert_fp16(export)
    else:     # every step in INT8 (float_steps=0): the first steps' fp32 graphs are tested in test_int8_plus.py
        quantize_int8(export, calib, mode="qdq", float_steps=0)
    tensorrt_precision = {"fp16": "fp16", "int8-qdq": "int8"}[precision]
    assert onnx_for(export, "step", tensorrt_precision, True).name == f"step.{precision}.onnx"
    cset = load_calibration_set(calib)
    with open_runtime("ort", export, precision=precision) as rt:
        assert rt.describe() == f"ort:{precision} on CPU (fused step)"
        assert [f.name for f in rt.files] == [f"denoiser.{precision}.onnx", f"step.{precision}.onnx"]
        ddpm = make_steps(rt.schedule, "ddpm")                           # sigma > 0: the noise input counts
        feeds = list(cset.step_batches())
        assert len(feeds) == 3 and all(len(f["x_t"]) == 1 and f["guidance"][0] == 2.0 for f in feeds)
        assert all(f["y"].tolist() == [1] and f["null_y"].tolist() == [4] for f in feeds)   # the recorded rows
        for f in feeds:
            t = int(f["t"][0])
            for coefs in (f["coefs"], ddpm[len(ddpm) - 1 - t].coefs):
                got = rt.step(f["x_t"], t, {"y": f["y"]}, 2.0, coefs, f["noise"])
                ref = guided_step(rt.denoise, f["x_t"], t, {"y": f["y"]}, {"y": f["null_y"]}, 2.0, coefs, f["noise"])
                assert np.isfinite(got).all() and rel_l2(got, ref) < tol, (t, rel_l2(got, ref))


@pytest.mark.parametrize("mode,op", [("dynamic", "MatMulInteger"), ("qdq", "QuantizeLinear")])
def test_int8_runs_and_stays_close(export, calib, reference, mode, op):
    from vdit_deploy.export.metadata import read_metadata

    path = quantize_int8(export, calib, mode=mode)
    assert path.name == {"dynamic": "denoiser.int8-dynamic.onnx", "qdq": "denoiser.int8-qdq.onnx"}[mode]
    assert read_metadata(path).precision == {"dynamic": "int8-dynamic", "qdq": "int8-qdq"}[mode]
    count = lambda p: sum(n.op_type == op for n in onnx.load(str(p)).graph.node)
    assert count(path) > 0
    step = export / f"step.{read_metadata(path).precision}.onnx"       # the fused step: Q/DQ (TensorRT) only
    assert step.is_file() == (mode == "qdq")
    if mode == "qdq":                                                   # same layers quantized as the denoiser
        assert count(step) == count(path) and read_metadata(step).kind == "step"
    got = run_onnx(path, load_calibration_set(calib))
    err = rel_l2(got, reference)
    assert np.isfinite(got).all() and 0 < err < 0.15
    worse = quantize_int8(export, calib, mode=mode, per_channel=False, keep_fp=(),
                          out=export / f"worse.{mode}.onnx")                 # everything, per-tensor weights
    assert count(worse) > count(path)                  # the sensitive layers (adaLN, final layer...) stayed float
    assert rel_l2(run_onnx(worse, load_calibration_set(calib)), reference) > err


def test_old_dynamic_int8_name_stays_readable(export, calib, tmp_path):
    """Releases before int8-dynamic wrote denoiser.int8.onnx stamped "int8": found and run as int8-dynamic;
    `--precision int8` on ONNX Runtime is that graph (TensorRT's int8 is the Q/DQ one)."""
    from vdit_deploy.export.metadata import check_export_dir, find_onnx, read_metadata, stamp
    from vdit_deploy.runtimes import open_runtime

    new = quantize_int8(export, calib, mode="dynamic")
    old = shutil.copytree(export, tmp_path / "old", ignore=shutil.ignore_patterns("*.int8-dynamic.onnx", "calib*"))
    model = onnx.load(str(new))
    stamp(model, {"vdit.precision": "int8"})
    onnx.save(model, str(old / "denoiser.int8.onnx"))
    assert find_onnx(old, "denoiser", "int8-dynamic").name == "denoiser.int8.onnx"
    assert read_metadata(old / "denoiser.int8.onnx").precision == "int8-dynamic"
    assert old / "denoiser.int8.onnx" in check_export_dir(old)
    for precision in ("int8", "int8-dynamic"):
        with open_runtime("ort", old, precision=precision) as rt, open_runtime("ort", export, precision="int8") as now:
            assert [f.name for f in rt.files] == ["denoiser.int8.onnx"] and rt.precision == "int8-dynamic"
            assert [f.name for f in now.files] == ["denoiser.int8-dynamic.onnx"]
            x = np.random.default_rng(0).standard_normal((2, *rt.contract.latent), dtype=np.float32)
            t, y = np.float32([10, 500]), {"y": np.int32([0, 1])}
            assert np.array_equal(rt.denoise(x, t, y), now.denoise(x, t, y))


def test_qdq_methods(export, calib, reference):
    errs = {}
    for method in ("percentile", "entropy"):
        path = quantize_int8(export, calib, mode="qdq", method=method, out=export / f"q-{method}.onnx")
        errs[method] = rel_l2(run_onnx(path, load_calibration_set(calib)), reference)
    assert all(0 < e < 0.3 for e in errs.values()), errs


def test_sensitivity_ranks_layers(export, calib):
    from vdit_deploy.calibration.sensitivity import sensitivity, table

    errors = sensitivity(export, calib, layers=r"blocks\.0\.mlp|final_layer\.linear")
    assert {e.layer for e in errors} == {"blocks.0.mlp.0", "blocks.0.mlp.2", "final_layer.linear"}
    assert all(e.eps_rel_l2 > 0 for e in errors)
    assert errors == sorted(errors, key=lambda e: -e.eps_rel_l2)
    assert [e.kept_fp for e in errors if e.layer == "final_layer.linear"] == [True]
    assert "final_layer.linear" in table(errors)
    # groups with nothing the mode quantizes are left out, not an error: the attention core (both modes),
    # t_embedder's Gemms (dynamic INT8 has no integer Gemm)
    some = r"^t_embedder\.mlp\.0$|blocks\.0\.attn_space\.(qkv|scaled_dot_product_attention)"
    assert {e.layer for e in sensitivity(export, calib, layers=some)} == {"blocks.0.attn_space.qkv"}
    assert {e.layer for e in sensitivity(export, calib, mode="qdq", layers=some)} == {
        "t_embedder.mlp.0", "blocks.0.attn_space.qkv"}


def test_report_files(export, calib, tmp_path):
    from vdit_deploy.calibration.report import accuracy_report

    convert_fp16(export)
    quantize_int8(export, calib, mode="dynamic")
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["calibrate", "report", str(export), "--steps", "4", "--seeds", "1",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]) == {"fp16", "int8"} and len(report["timesteps"]) == 4
    assert report["results"]["fp16"]["psnr_db"] > report["results"]["int8"]["psnr_db"]
    assert len(report["results"]["int8"]["eps_rel_l2_per_step"]) == 4
    int8 = report["results"]["int8"]   # `vdit compare`'s accuracy fields: worst seed, per seed
    assert int8["finite"] and int8["psnr_db"] == min(s["psnr_db"] for s in int8["per_seed"])
    assert (out / "eps_error.png").stat().st_size > 0
    assert report["files"]["gif_columns"] == ["fp32", "fp16", "int8"]
    import imageio.v3 as iio
    frames = iio.imread(out / "samples.gif", index=None)
    # 4 labels in rows, fp32 | fp16 | int8 (16 px x4 + pad), under a band with each column's name
    assert frames.shape[0] == 8 and frames.shape[2] == 3 * 65 + 1 and frames.shape[1] > 4 * 65 + 1
    with pytest.raises(VditError, match="denoiser.bf16.onnx"):
        accuracy_report(export, ["bf16"], steps=2, out_dir=tmp_path / "r2")


def test_cli_names_what_it_writes_and_keeps(export, calib, monkeypatch):
    """fp16 names both graphs it writes; int8 lists only the keep-in-float patterns that match this model
    (not Latte's), with sizes people read; qdq shows a bar per calibration batch where progress is on."""
    monkeypatch.setenv("VDIT_PROGRESS", "1")
    result = CliRunner().invoke(main, ["calibrate", "fp16", str(export)])
    assert result.exit_code == 0, result.output
    assert "denoiser.fp16.onnx (" in result.output and "step.fp16.onnx (" in result.output
    result = CliRunner().invoke(main, ["calibrate", "int8", str(export), "--mode", "qdq", "--calib", str(calib)])
    assert result.exit_code == 0, result.output
    kept = result.stdout.split("kept in float: ")[1].splitlines()[0]
    assert "adaLN_modulation" in kept and "net" not in kept and "step.int8-qdq.onnx" in result.stdout
    assert "calibrate denoiser.onnx" in result.stderr and "calibrate step.onnx" in result.stderr


def test_cli_collect(export, tmp_path):
    result = CliRunner().invoke(main, ["calibrate", "collect", str(export), "--out", str(tmp_path / "s"),
                                       "--steps", "3", "--seeds", "1", "--label", "0", "--timesteps", "2"])
    assert result.exit_code == 0, result.output
    assert "4 rows" in result.output


@pytest.mark.gpu
def test_trt_calibration_cache(export, calib):
    reason = trt_skip_reason()
    if reason:
        pytest.skip(reason)
    result = CliRunner().invoke(main, ["calibrate", "trt-cache", str(export), "--calib", str(calib)])
    assert result.exit_code == 0, result.output
    assert (export / "denoiser.calib.cache").stat().st_size > 0


def test_fp16_graph_has_one_writer_per_tensor():
    """onnxruntime < 1.32's fp16 converter repeats a shared Cast per consumer (same name, same output);
    ONNX Runtime refuses such a graph. unique_outputs keeps one."""
    from onnx import TensorProto, helper

    from vdit_deploy.calibration.fp16 import unique_outputs

    cast = lambda: helper.make_node("Cast", ["h"], ["h_cast_to_fp32"], to=TensorProto.FLOAT, name="h_cast_to_fp32_node")
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"), cast(),
             helper.make_node("Exp", ["h_cast_to_fp32"], ["a"], name="exp"), cast(),
             helper.make_node("Log", ["h_cast_to_fp32"], ["b"], name="log")]
    kept = unique_outputs(nodes)
    assert [n.name for n in kept] == ["relu", "h_cast_to_fp32_node", "exp", "log"]


# ---- a text-conditioned, learned-sigma model (tiny diffusers Latte) ---------------------------------
def write_cond(path, rows: int, seq: int = 16, seed: int = 0):
    """A --cond file: `rows` prompts' (stand-in) text embeddings, padded to the null's 16 tokens."""
    from safetensors.numpy import save_file

    emb = np.random.default_rng(seed).standard_normal((rows, seq, 32)).astype(np.float32)
    save_file({"encoder_hidden_states": emb}, str(path))
    return path, emb


@pytest.fixture(scope="module")
def latte(tiny_latte_export, tmp_path_factory):
    """A private copy of the Latte export, a 2-prompt --cond file, and a set collected from it on the CLI."""
    root = tmp_path_factory.mktemp("latte-calib")
    export = shutil.copytree(tiny_latte_export, root / "export")
    cond, emb = write_cond(root / "prompts.safetensors", 2)
    result = CliRunner().invoke(main, ["calibrate", "collect", str(export), "--out", str(root / "set"),
                                       "--sampler", "ddim", "--steps", "4", "--seeds", "1", "--timesteps", "2",
                                       "--cond", str(cond)])
    assert result.exit_code == 0, result.output
    return export, root / "set", cond, emb


def test_latte_set_records_the_text_conditioning_and_its_null(latte):
    from vdit_deploy.contract import NULL_FILE, Contract, load_null
    from vdit_deploy.export.metadata import read_metadata

    export, calib, cond, emb = latte
    contract = read_metadata(export / "denoiser.onnx").contract
    m = json.loads((calib / "manifest.json").read_text())
    assert m["shapes"] == {"x_t": [8, 4, 2, 8, 8], "t": [8], "encoder_hidden_states": [8, 16, 32]}   # 2 calls x 2B
    assert m["cond_file"] == str(cond.resolve()) and "labels" not in m and m["videos"] == 2
    assert Contract.from_dict(m["contract"]) == contract
    cset = load_calibration_set(calib, read_metadata(export / "denoiser.onnx").checkpoint_sha256, contract)
    null = load_null(contract, export)["encoder_hidden_states"]
    for r in m["records"]:
        (start, end), (null_start, _) = r["rows"], r["null_rows"]
        assert null_start == start + 2
        assert np.array_equal(cset.arrays["encoder_hidden_states"][start:null_start], emb)      # the prompts
        assert np.array_equal(cset.arrays["encoder_hidden_states"][null_start:end], np.repeat(null, 2, 0))
    assert [sorted(b) for b in cset.batches()] == [["encoder_hidden_states", "t", "x_t"]] * 2
    assert (export / NULL_FILE).is_file()


def test_latte_collect_needs_cond_and_refuses_another_contract(latte, tiny_latte, tmp_path):
    export, calib, _, _ = latte
    result = CliRunner().invoke(main, ["calibrate", "collect", str(export), "--out", str(tmp_path / "s"),
                                       "--steps", "2", "--seeds", "1"])
    assert result.exit_code == 1 and result.output.startswith("Error: this model is conditioned on encoder_hidden_states")
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "s").exists()
    # the same weights loaded with the default options (1..120 tokens, null padded to 120): another contract
    cond, _ = write_cond(tmp_path / "long.safetensors", 1, seq=120)
    other = collect(tiny_latte, tmp_path / "other", sampler="ddim", steps=2, seeds=[0], timesteps=1, cond=cond)
    assert json.loads((other / "manifest.json").read_text())["runtime"] == "torch:fp32"
    result = CliRunner().invoke(main, ["calibrate", "int8", str(export), "--calib", str(other)])
    assert result.exit_code == 1 and result.output.startswith("Error: calibration set")
    assert "another model contract" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (export / "denoiser.int8-dynamic.onnx").exists()


@pytest.mark.parametrize("command,files", [
    (["fp16"], ["denoiser.fp16.onnx", "step.fp16.onnx"]),
    (["int8", "--mode", "dynamic"], ["denoiser.int8-dynamic.onnx"]),
    (["int8", "--mode", "qdq"], ["denoiser.int8-qdq.onnx", "step.int8-qdq.onnx"])], ids=["fp16", "dynamic", "qdq"])
def test_latte_variants(latte, command, files):
    """fp16 and int8 of a graph with text conditioning and eps+var output (8 channels): the contract
    stays in the metadata, the learned-variance channels come out, close to fp32 on the set."""
    from vdit_deploy.export.metadata import check_export_dir, read_metadata

    export, calib, _, _ = latte
    result = CliRunner().invoke(main, ["calibrate", *command, str(export), "--calib", str(calib)])
    assert result.exit_code == 0, result.output
    fp32 = read_metadata(export / "denoiser.onnx")
    for name in files:
        meta = read_metadata(export / name)
        assert meta.contract == fp32.contract and meta.model == fp32.model and name.split(".")[1] == meta.precision
    assert {p.name for p in check_export_dir(export)} >= {"denoiser.onnx", *files}
    cset = load_calibration_set(calib)
    got, ref = run_onnx(export / files[0], cset), run_onnx(export / "denoiser.onnx", cset)
    assert got.shape == ref.shape == (8, 8, 2, 8, 8)
    assert np.isfinite(got).all() and 0 < rel_l2(got, ref) < (5e-3 if command == ["fp16"] else 0.2)
    assert 0 < rel_l2(got[:, 4:], ref[:, 4:]) < 0.2                    # the variance channels, quantized too


@pytest.mark.parametrize("precision", ["fp16", "int8-qdq"])
def test_latte_fused_step_equals_host_step(latte, precision):
    """The fp16 / Q/DQ step graph with the recorded prompt and null rows: the same precision's denoiser
    plus the fp32 host update, for DDIM and DDPM with the learned variance."""
    from vdit_deploy.sampling import sampler_plan
    from vdit_deploy.samplers import guided_step
    from vdit_deploy.runtimes import open_runtime

    export, calib, _, emb = latte
    if precision == "fp16":
        convert_fp16(export)
    else:
        quantize_int8(export, calib, mode="qdq", float_steps=0)     # every step in INT8, as above
    with open_runtime("ort", export, precision=precision) as rt:
        assert rt.describe() == f"ort:{precision} on CPU (fused step)"
        ddpm = sampler_plan(rt.contract, "ddpm")
        assert ddpm[0].coefs[-1] == 1.0                                   # learned variance on (t > 0)
        feeds = list(load_calibration_set(calib).step_batches())
        assert len(feeds) == 2 and all(np.array_equal(f["encoder_hidden_states"], emb) for f in feeds)
        for f in feeds:
            t = int(f["t"][0])
            cond, null = {"encoder_hidden_states": f["encoder_hidden_states"]}, \
                {"encoder_hidden_states": f["null_encoder_hidden_states"]}
            for coefs in (f["coefs"], ddpm[len(ddpm) - 1 - t].coefs):
                got = rt.step(f["x_t"], t, cond, 2.0, coefs, f["noise"])
                ref = guided_step(rt.denoise, f["x_t"], t, cond, null, 2.0, coefs, f["noise"])
                assert np.isfinite(got).all() and rel_l2(got, ref) < 1e-2, (t, rel_l2(got, ref))
