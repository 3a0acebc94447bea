"""`vdit compare` on the tiny checkpoint: real runtimes, real numbers, checked for sanity (not values)."""
import copy
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import trt_skip_reason
from vdit_deploy.cli import main
from vdit_deploy.compare import SCHEMA_VERSION, Artifacts, Target, compare, format_table, parse_ints, parse_runtimes
from vdit_deploy.compare.measure import accuracy
from vdit_deploy.errors import VditError

RUNTIMES = "torch:fp32,ort:fp32,ort:fp16,ort:int8,trt:fp16"


@pytest.fixture(scope="module")
def report(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "report"
    logs = []
    # min PSNR 80 dB: fp32 with identical noise is far above it (> 100 dB), quantized graphs below
    compare(tiny_checkpoint, out, RUNTIMES, steps=3, batches=[1], seeds=[0], repeats=3, threads=1,
            min_psnr=80, progress=False, log=logs.append)
    return out, json.loads((out / "report.json").read_text()), logs


def rows_by_label(data):
    return {r["label"]: r for r in data["results"] if r["batch"] == 1}


def test_compare_writes_every_output(report):
    out, data, _ = report
    assert data["schema_version"] == SCHEMA_VERSION
    for name in ("report.json", "report.md", "latency.png", "error_vs_timestep.png", "samples.gif"):
        assert (out / name).stat().st_size > 0, name
    assert data["files"]["gif"] == "samples.gif"
    assert data["gif_columns"] == ["torch:fp32", "ort:fp32", "ort:fp16", "ort:int8"]
    assert "torch:fp32" in (out / "report.md").read_text()
    assert data["machine"]["cpu"] and data["machine"]["cpu_cores"] >= 1
    assert data["machine"]["libraries"]["numpy"] and data["machine"]["libraries"]["onnxruntime"]
    assert not list(out.glob(".*tmp*"))


def test_identical_noise_gives_fp32_near_zero_error_and_int8_more(report):
    _, data, _ = report
    rows = rows_by_label(data)
    assert data["reference"] == "torch:fp32" and rows["torch:fp32"]["accuracy"]["reference"]
    fp32, fp16, int8 = (rows[k]["accuracy"] for k in ("ort:fp32", "ort:fp16", "ort:int8"))
    assert fp32["eps_rel_l2_max"] < 1e-4 and fp32["video_rel_l2"] < 1e-4
    assert len(fp32["eps_rel_l2_per_step"]) == 3 == len(rows["ort:fp32"]["timesteps"])
    # reduced precision: real, clearly larger errors (how much depends on the quantizer's choices)
    for low in (fp16, int8):
        assert low["eps_rel_l2_mean"] > max(10 * fp32["eps_rel_l2_mean"], 1e-5)
        assert low["max_abs"] > fp32["max_abs"] and low["psnr_db"] < 80 and 0 < low["ssim"] < 1
        assert low["below_threshold"]
    assert fp32["psnr_db"] is None or fp32["psnr_db"] > 80    # None: bit-identical
    assert not fp32["below_threshold"]


def test_latencies_are_positive_and_repeatable(report):
    _, data, _ = report
    for row in data["results"]:
        assert row["status"] == "ok", row
        lat = row["latency"]
        sample = lat["sample_s"]
        assert sample["n"] == 3 and 0 < sample["min"] <= sample["median"] <= sample["p90"] <= sample["max"]
        assert sample["max"] < 10 * sample["min"], f"{row['label']} latency is not repeatable: {sample}"
        assert lat["step_ms"]["n"] == 9 and lat["step_ms"]["median"] > 0 and lat["denoise_ms"]["median"] > 0
        assert lat["denoise_batch"] == 2                     # cond + null, guidance 2
        # a sample is 3 steps: its time cannot be less than the steps' (host loop adds a little)
        assert sample["median"] >= 3 * lat["step_ms"]["min"] / 1e3
        assert row["throughput_videos_per_s"] == pytest.approx(1 / sample["median"])
        assert row["startup"]["load_s"] > 0 and row["startup"]["first_call_s"] > 0
        assert row["artifact"]["bytes"] > 100_000
        assert row["memory"]["host_peak_rss_mb"] > 0
    rows = rows_by_label(data)
    assert rows["ort:fp16"]["artifact"]["bytes"] < rows["ort:fp32"]["artifact"]["bytes"]


def test_unavailable_runtimes_are_listed_with_a_reason(report):
    _, data, _ = report
    skipped = {s["label"]: s["reason"] for s in data["skipped"]}
    if trt_skip_reason() is None:
        pytest.skip("TensorRT runs here: nothing to skip")
    assert "trt:fp16" in skipped and ("GPU" in skipped["trt:fp16"] or "TensorRT" in skipped["trt:fp16"])
    assert "trt:fp16" in format_table(data, color=False) and "skipped" in format_table(data, color=False)


def test_rows_under_the_threshold_are_red(report):
    _, data, _ = report
    table = format_table(data, color=True)
    red = [line.split()[0].removeprefix("\x1b[31m") for line in table.splitlines() if line.startswith("\x1b[31m")]
    below = [r["label"] for r in data["results"] if r["accuracy"].get("below_threshold")]
    assert red == below == ["ort:fp16", "ort:int8"]


def test_artifacts_are_reused_when_the_checkpoint_matches(report, tiny_checkpoint):
    out, data, first_logs = report
    assert any("exporting" in m for m in first_logs)
    logs = []
    targets = parse_runtimes(RUNTIMES)
    arts = Artifacts(tiny_checkpoint, out, targets, [1], "ddim", 3, 0.0, 2.0, [0], log=logs.append)
    assert logs and "reusing" in logs[0] and not any("quantizing" in m or "converting" in m for m in logs)
    assert str(arts.export) == data["source"]["export_dir"]


def test_compare_cli_on_an_export_dir(report, tmp_path):
    out, export_dir = tmp_path / "r", tmp_path / "export"
    shutil.copytree(report[1]["source"]["export_dir"], export_dir,
                    ignore=shutil.ignore_patterns("calib-*", "denoiser.fp16.onnx"))
    result = CliRunner().invoke(main, ["compare", str(export_dir), "--runtimes", "ort:fp32,ort:fp16",
                                       "--steps", "2", "--batch", "2", "--seeds", "3", "--repeats", "1",
                                       "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    assert data["source"]["kind"] == "export" and data["reference"] == "torch:fp32"   # its recorded checkpoint
    assert [r["label"] for r in data["results"]] == ["torch:fp32", "ort:fp32"]
    # an export dir is used as it is: a missing precision variant is skipped with the runtime's reason
    assert "denoiser.fp16.onnx" in data["skipped"][0]["reason"]
    assert "ort:fp16" in result.output and "skipped" in result.output


def test_parsing():
    assert parse_ints("0-3", "--seeds") == [0, 1, 2, 3] and parse_ints("1,4", "--batch") == [1, 4]
    assert parse_runtimes("ort:int8, torch") == [Target("ort", "int8"), Target("torch", "fp32")]
    with pytest.raises(VditError, match="unknown runtime"):
        parse_runtimes("tensorflow:fp32")
    with pytest.raises(VditError, match="integers"):
        parse_ints("a-b", "--seeds")


def test_cli_missing_source_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and result.output.startswith("Error:") and "Traceback" not in result.output


@pytest.mark.parametrize("runtimes", ["torch:fp32,ort:int8", "ort:int8,ort:fp32"], ids=["added", "asked-last"])
def test_ort_fp32_is_the_reference_when_the_checkpoint_is_gone(report, tmp_path, runtimes):
    import onnx

    export_dir = tmp_path / "export"
    shutil.copytree(report[1]["source"]["export_dir"], export_dir, ignore=shutil.ignore_patterns("calib-*"))
    model = onnx.load(str(export_dir / "denoiser.onnx"))
    for prop in model.metadata_props:
        if prop.key == "vdit.checkpoint":
            prop.value = str(tmp_path / "moved-away")
    onnx.save(model, str(export_dir / "denoiser.onnx"))
    data = compare(export_dir, tmp_path / "r", runtimes, steps=2, batches=[1], seeds=[0],
                   repeats=1, threads=1, progress=False, log=lambda m: None)
    assert data["reference"] == "ort:fp32" and "moved-away" in data["skipped"][0]["reason"]
    # the reference runs first wherever it was asked for, so every other row is scored against it
    assert [r["label"] for r in data["results"]] == ["ort:fp32", "ort:int8"]
    assert data["results"][1]["accuracy"]["eps_rel_l2_mean"] > 1e-4 and "torch:fp32 is unavailable" in data["notes"][0]


def test_non_finite_videos_are_not_bit_identical(report):
    """Neither a NaN video nor an identical one has a PSNR: `finite` tells them apart in the JSON and the table."""
    ref = np.random.default_rng(0).standard_normal((1, 3, 2, 8, 8)).astype(np.float32)
    bad = ref.copy()
    bad[0, 0, 0, 0, 0] = np.nan
    acc = accuracy({0: ref.copy(), 1: bad}, {0: ref, 1: ref}, [[0.0], [0.5]], [0, 1])
    assert acc["per_seed"][0]["finite"] and acc["per_seed"][0]["psnr_db"] is None     # bit-identical
    assert not acc["per_seed"][1]["finite"] and not acc["finite"] and acc["eps_rel_l2_max"] == 0.5
    data = copy.deepcopy(report[1])
    row = rows_by_label(data)["ort:fp32"]
    row["accuracy"].update(finite=False, psnr_db=None)
    line = next(line for line in format_table(data, color=False).splitlines() if line.startswith("ort:fp32"))
    assert "non-finite" in line and "identical" not in line


# ---- a text-conditioned, learned-sigma model (tiny diffusers Latte) ---------------------------------
@pytest.fixture(scope="module")
def latte_report(tiny_latte_export, tmp_path_factory):
    """export -> calibrate (collect --cond, int8 dynamic) -> compare --cond, from the command line."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("compare-latte")
    export = shutil.copytree(tiny_latte_export, root / "export")
    emb = np.random.default_rng(0).standard_normal((3, 16, 32)).astype(np.float32)   # 3 prompts, 16 tokens
    save_file({"encoder_hidden_states": emb}, str(root / "prompts.safetensors"))
    cond = ["--cond", str(root / "prompts.safetensors")]
    runner = CliRunner()
    for args in (["collect", str(export), "--out", str(root / "set"), "--steps", "2", "--seeds", "1",
                  "--timesteps", "1", *cond], ["int8", str(export), "--calib", str(root / "set")]):
        result = runner.invoke(main, ["calibrate", *args])
        assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["compare", str(export), "--runtimes", "torch:fp32,ort:fp32,ort:int8", "--steps", "2",
                                  "--batch", "2", "--seeds", "0,2", "--repeats", "1", "--threads", "1", *cond,
                                  "--out", str(root / "r")])
    assert result.exit_code == 0, result.output
    return root, json.loads((root / "r" / "report.json").read_text())


def test_latte_compare_same_noise_and_conditioning(latte_report):
    root, data = latte_report
    rows = {r["label"]: r for r in data["results"] if r["batch"] == 2}
    assert data["reference"] == "torch:fp32" and list(rows) == ["torch:fp32", "ort:fp32", "ort:int8"]
    assert all(r["status"] == "ok" for r in rows.values()) and not data["skipped"]
    assert str(root / "prompts.safetensors") in data["settings"]["conditioning"]
    fp32, int8 = rows["ort:fp32"]["accuracy"], rows["ort:int8"]["accuracy"]
    # the torch reference (the diffusers model, loaded with the export's contract) and ORT fp32 agree:
    # same noise, same prompt rows, same null embeddings; int8 is clearly further off
    assert fp32["eps_rel_l2_max"] < 1e-4 and fp32["video_rel_l2"] < 1e-4
    assert int8["eps_rel_l2_mean"] > max(10 * fp32["eps_rel_l2_mean"], 1e-4) and int8["finite"]
    assert [s["seed"] for s in int8["per_seed"]] == [0, 2] and len(int8["eps_rel_l2_per_step"]) == 2
    assert rows["ort:int8"]["describe"].startswith("ort:int8-dynamic")
    assert data["files"]["gif"] is None and "GIF skipped" in data["notes"][0]   # 4 latent channels: no picture
    assert (root / "r" / "report.md").stat().st_size > 0


def test_latte_compare_needs_its_conditioning(latte_report, tmp_path):
    from safetensors.numpy import save_file

    root, _ = latte_report
    export = root / "export"
    save_file({"encoder_hidden_states": np.zeros((1, 16, 8), np.float32)}, str(tmp_path / "narrow.safetensors"))
    save_file({"encoder_hidden_states": np.zeros((1, 5, 32), np.float32)}, str(tmp_path / "short.safetensors"))
    for extra, message in (([], "Error: this model is conditioned on encoder_hidden_states"),
                           (["--cond", str(tmp_path / "narrow.safetensors")], "Error: "),
                           (["--cond", str(tmp_path / "short.safetensors")], "Error: the null conditioning's"),
                           (["--cond", str(tmp_path / "nope.safetensors")], "Error: ")):
        result = CliRunner().invoke(main, ["compare", str(export), "--runtimes", "ort:fp32", "--steps", "1",
                                           "--out", str(tmp_path / "r"), *extra])
        assert result.exit_code == 1 and result.output.startswith(message), result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r" / "report.json").exists()
