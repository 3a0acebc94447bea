"""Bring your own video DiT: a diffusers LatteTransformer3DModel saved with `save_pretrained` (text-
conditioned, learned sigma) through the command line, the contract's one-line refusals, and a
v-prediction model against diffusers' own DDIMScheduler loop."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_latte

pytestmark = pytest.mark.slow
D, SEQ = 32, 16          # the tiny Latte's caption width; the null conditioning's (and the prompts') length


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "vdit_deploy.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def assert_one_line_error(result, *needles):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def write_cond(path, **arrays):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
    return path


def prompts(b: int, seq: int = SEQ, seed: int = 1):
    return np.random.default_rng(seed).standard_normal((b, seq, D)).astype(np.float32)


def test_latte_export_verify_sample_from_the_command_line(tiny_latte, tmp_path):
    """save_pretrained dir -> vdit export (+ verify) -> vdit sample --cond on ONNX Runtime and on PyTorch:
    the same videos from the same noise and conditioning."""
    out = tmp_path / "export"
    result = run_cli("export", tiny_latte, "--out", out, "--batch", "1:4", "--seq", f"1:{SEQ}")
    assert result.returncode == 0, result.stderr
    assert "denoiser.onnx            out" in result.stdout and "FAIL" not in result.stdout
    assert {p.name for p in out.iterdir()} == {"denoiser.onnx", "step.onnx", "null_cond.safetensors"}
    info = run_cli("info", out)
    assert "output eps+var" in info.stdout and f"encoder_hidden_states: float32(batch, seq, {D})" in info.stdout
    cond = write_cond(tmp_path / "cond.safetensors", encoder_hidden_states=prompts(2))
    null = write_cond(tmp_path / "null.safetensors", encoder_hidden_states=np.zeros((1, SEQ, D), np.float32))
    videos = {}
    for name, args in (("ort", ["--runtime", "ort", "--onnx", out]),
                       ("torch", ["--runtime", "torch", "--checkpoint", tiny_latte, "--device", "cpu", "--null", null])):
        result = run_cli("sample", *args, "--cond", cond, "--sampler", "unipc", "--steps", 6, "--guidance", 3,
                         "--seed", 5, "--out", tmp_path / f"{name}.npy")
        assert result.returncode == 0, result.stderr
        videos[name] = np.load(tmp_path / f"{name}.npy")
    assert videos["ort"].shape == (2, 4, 2, 8, 8)
    assert np.abs(videos["ort"] - videos["torch"]).max() < 1e-3
    assert np.abs(videos["ort"][0] - videos["ort"][1]).max() > 1e-2    # the conditioning reaches the model


@pytest.mark.parametrize("arrays,needles", [
    ({"prompt": prompts(1)}, ["lacks encoder_hidden_states", "has unknown prompt",
                              f"encoder_hidden_states: float32(batch, seq, {D})"]),
    ({"encoder_hidden_states": prompts(1)[..., :D - 1]}, ["has 31 at axis 2", "float32(batch, seq, 32)"]),
    ({"encoder_hidden_states": prompts(1).astype(np.int32)}, ["is int32", "float32(batch, seq, 32)"]),
    ({"encoder_hidden_states": prompts(1)[0]}, ["float32[16, 32]", "float32(batch, seq, 32)"]),
    ({"encoder_hidden_states": prompts(1, seq=8)}, ["null conditioning", "same length"]),
    ({"encoder_hidden_states": prompts(1, seq=SEQ + 1)}, ["seq = 17, outside 1..16"]),
])
def test_bad_conditioning_file_is_one_line_naming_the_contract(tiny_latte_export, tmp_path, arrays, needles):
    cond = write_cond(tmp_path / "cond.safetensors", **arrays)
    result = run_cli("sample", "--runtime", "ort", "--onnx", tiny_latte_export, "--cond", cond, "--steps", 2,
                     "--out", tmp_path / "v.npy")
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "v.npy").exists()


def test_text_model_refuses_labels_a_missing_cond_and_a_gif(tiny_latte_export, tmp_path):
    cond = write_cond(tmp_path / "cond.safetensors", encoder_hidden_states=prompts(1))
    result = run_cli("sample", "--runtime", "ort", "--onnx", tiny_latte_export, "--cond", cond, "--steps", 2,
                     "--out", tmp_path / "v.gif")
    assert_one_line_error(result, "latents have 4 channels", "export-decoder", ".npy")   # before sampling
    for extra, needle in ((["--label", "1"], "not on class labels"), ([], "pass --cond")):
        result = run_cli("sample", "--runtime", "ort", "--onnx", tiny_latte_export, *extra, "--steps", 2,
                         "--out", tmp_path / "v.npy")
        assert_one_line_error(result, needle)


def test_unknown_output_kind_is_refused_at_export(tmp_path):
    """Channels the scheduler config cannot explain (3C), a kind that contradicts the channel count, and a
    directory with pickled weights only: each refused in one line, nothing written."""
    pytest.importorskip("diffusers")
    model = save_tiny_latte(tmp_path / "latte12", out_channels=12)
    result = run_cli("export", model, "--out", tmp_path / "e1", "--no-verify")
    assert_one_line_error(result, "cannot tell the output kind", "--output")
    result = run_cli("export", model, "--out", tmp_path / "e2", "--output", "v", "--no-verify")
    assert_one_line_error(result, "output kind v means 4 output channels", "has 12")
    weights = model / "diffusion_pytorch_model.safetensors"
    weights.rename(model / "diffusion_pytorch_model.bin")
    result = run_cli("export", model, "--out", tmp_path / "e3", "--output", "eps", "--no-verify")
    assert_one_line_error(result, "pickle files are never loaded")
    assert not any((tmp_path / f"e{i}").exists() for i in (1, 2, 3))


def test_v_prediction_model_matches_diffusers_ddim(tmp_path):
    """A v-prediction Latte (scheduler_config.json prediction_type v_prediction) exported and sampled by
    ONNX Runtime's fused step equals diffusers' DDIMScheduler driving the PyTorch model, step by step
    from the same x_T (guidance 1: the scheduler alone)."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    from vdit_deploy.samplers import make_steps
    from vdit_deploy.export.onnx_export import export_checkpoint
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import sample
    from vdit_deploy.sources import load_source

    model_dir = save_tiny_latte(tmp_path / "latte_v", out_channels=4, variance_type="fixed_small",
                                prediction_type="v_prediction", seed=3)
    export = export_checkpoint(model_dir, tmp_path / "export", batch=(1, 2), seq=(1, SEQ))
    steps, seed = 10, 11
    cond = {"encoder_hidden_states": prompts(1)}
    with open_runtime("ort", export) as rt:
        assert rt.contract.output == "v"
        ours = sample(rt, rt.contract, cond, make_steps(rt.schedule, "ddim", steps, prediction="v"), 1.0, seed)
    # diffusers: its DDIM steps from t to t - T // n; with 10 linspace steps over T = 1000 (stride 111)
    # that is the next listed timestep once n = 1000 // 111 (tests/test_samplers.py: the same trick)
    source = load_source(model_dir)
    config = json.loads((model_dir / "scheduler_config.json").read_text())
    scheduler = diffusers.DDIMScheduler.from_config(config, timestep_spacing="linspace", clip_sample=True,
                                                    clip_sample_range=1.0)
    scheduler.alphas_cumprod = torch.from_numpy(source.contract.schedule.alphas_cumprod)   # float64, as ours
    scheduler.set_timesteps(steps)
    scheduler.num_inference_steps = 1000 // math.ceil(999 / (steps - 1))
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((1, 4, 2, 8, 8), dtype=np.float32))
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = source.module(x, torch.full((1,), float(t)), torch.from_numpy(cond["encoder_hidden_states"]))
            x = scheduler.step(v, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    theirs = x.numpy()
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-4


def test_python_api_module_with_mask_and_contract(tmp_path):
    """Source(module, contract, null) -> export_source -> ONNX Runtime's fused step equals the torch runtime
    on the same noise and conditioning; the mask really masks (padding tokens change nothing)."""
    import torch

    from vdit_deploy.contract import CondInput, Contract
    from vdit_deploy.schedules import Schedule
    from vdit_deploy.samplers import make_steps
    from vdit_deploy.export.onnx_export import export_source
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.runtimes.torch_runtime import TorchRuntime
    from vdit_deploy.sampling import sample
    from vdit_deploy.sources import DiffusersDenoiser, Source

    pytest.importorskip("diffusers")
    from own_models import MaskedTextDiT

    torch.manual_seed(0)
    contract = Contract(latent=(3, 2, 4, 4), output="x0", schedule=Schedule("cosine", 1000), axes={"seq": (2, 12)},
                        cond=(CondInput("context", "float32", ("batch", "seq", 8)),
                              CondInput("mask", "float32", ("batch", "seq"))))
    null = {"context": np.zeros((1, 6, 8), np.float32), "mask": np.ones((1, 6), np.float32)}
    source = Source(DiffusersDenoiser(MaskedTextDiT().eval(), contract.names), contract, null)
    export = export_source(source, tmp_path / "export", batch=(1, 3))
    rng = np.random.default_rng(0)
    cond = {"context": rng.standard_normal((2, 6, 8)).astype(np.float32),
            "mask": np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.float32)}
    plan = make_steps(contract.schedule, "unipc", 5, prediction="x0")
    with open_runtime("ort", export) as ort_rt, TorchRuntime(None, source=source, device="cpu") as torch_rt:
        assert ort_rt.contract == source.contract
        got = sample(ort_rt, ort_rt.contract, cond, plan, 2.0, 3)
        want = sample(torch_rt, torch_rt.contract, cond, plan, 2.0, 3)
        np.testing.assert_allclose(got, want, atol=1e-4)
        padded = {k: v.copy() for k, v in cond.items()}
        padded["context"][0, 4:] = 100.0                      # behind the mask: no effect on video 0
        again = sample(ort_rt, ort_rt.contract, padded, plan, 2.0, 3)
        np.testing.assert_allclose(again[0], got[0], atol=1e-4)
        assert np.abs(again[1] - got[1]).max() == 0
    # verify from Python: the Source it came from (no model directory recorded: said so, not "model . is not
    # there"); its prompts take the null's 6 tokens, not the range's 12
    from vdit_deploy.errors import VditError
    from vdit_deploy.export.verify import verify

    with pytest.raises(VditError, match="records no model directory"):
        verify(export)
    assert verify(export, source=source, batches=(1,), num_steps=3, picks=2, polygraphy=False).ok


def test_any_diffusers_model_by_class_name_from_the_command_line(tmp_path):
    """A ModelMixin vdit does not know, saved with save_pretrained: `vdit export --class module:Class
    --latent --input ... --output` (a text input and its attention mask, an x0 model, no scheduler config:
    the schedule from --scheduler-config), then verify and sample --cond on ONNX Runtime."""
    pytest.importorskip("diffusers")
    import os

    import torch
    from diffusers import DDIMScheduler
    from own_models import MaskedTextDiT

    torch.manual_seed(0)
    MaskedTextDiT().save_pretrained(tmp_path / "model")
    DDIMScheduler(beta_schedule="scaled_linear", prediction_type="sample").save_pretrained(tmp_path / "elsewhere")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    run = lambda *args: subprocess.run([sys.executable, "-m", "vdit_deploy.cli", *map(str, args)], capture_output=True,
                                       text=True, timeout=600, env=env)
    export = tmp_path / "export"
    spec = ["--latent", "3,2,4,4", "--input", "context:float32:seq,8", "--input", "mask:float32:seq"]
    result = run("export", tmp_path / "model", "--out", export, "--class", "own_models:MaskedTextDiT", *spec,
                 "--seq", "2:12", "--batch", "1:3")
    assert_one_line_error(result, "no scheduler_config.json", "--scheduler-config")   # no schedule: not guessed
    result = run("export", tmp_path / "model", "--out", export, "--class", "own_models:MaskedTextDiT", *spec,
                 "--seq", "2:12", "--batch", "1:3", "--output", "x0",
                 "--scheduler-config", tmp_path / "elsewhere" / "scheduler_config.json")
    assert result.returncode == 0, result.stderr
    assert "step.onnx                x_prev" in result.stdout and "FAIL" not in result.stdout
    info = run("info", export).stdout
    assert "output x0" in info and "context: float32(batch, seq, 8); mask: float32(batch, seq), seq 2..12" in info
    assert '"kind": "scaled_linear"' in info
    cond = write_cond(tmp_path / "cond.safetensors", context=np.ones((2, 12, 8), np.float32),
                      mask=np.ones((2, 12), np.float32))
    result = run("sample", "--runtime", "ort", "--onnx", export, "--cond", cond, "--steps", 3, "--out", tmp_path / "v.npy")
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "v.npy").shape == (2, 3, 2, 4, 4)


def test_a_short_null_exports_and_verifies_with_the_default_seq(tiny_latte, tmp_path):
    """README's Latte line (issue 26): an 8-token empty prompt and the default --seq 1:120 were written, then
    refused by verify. The export takes them, verify pairs prompts of the null's length, and says so."""
    null = write_cond(tmp_path / "null.safetensors", encoder_hidden_states=np.zeros((1, 8, D), np.float32))
    result = run_cli("export", tiny_latte, "--out", tmp_path / "export", "--batch", "1:2", "--null", null)
    assert result.returncode == 0, result.stderr
    assert "FAIL" not in result.stdout and "prompts take seq = 8" in result.stdout
    assert re.search(r"null_cond.safetensors 1\.[0-9] kB", result.stdout)   # 8 x 32 floats: not "0.0 MB"


def test_a_null_outside_the_token_range_is_refused_before_loading(tiny_latte, tmp_path):
    null = write_cond(tmp_path / "null.safetensors", encoder_hidden_states=np.zeros((1, 20, D), np.float32))
    result = run_cli("export", tiny_latte, "--out", tmp_path / "export", "--seq", "1:16", "--null", null)
    assert_one_line_error(result, "seq = 20", "outside 1..16", "--seq")
    assert not (tmp_path / "export").exists()


def test_compare_a_model_directory_takes_null_and_seq_and_refuses_cleanly(tiny_latte, tmp_path):
    """`vdit compare` on a diffusers directory: --null and --seq as export takes them; a refusal (prompts
    another length than the null, or no prompts at all) is one line and leaves no report directory."""
    null = write_cond(tmp_path / "null.safetensors", encoder_hidden_states=np.zeros((1, 8, D), np.float32))
    short = write_cond(tmp_path / "short.safetensors", encoder_hidden_states=prompts(2, seq=8))
    common = ["compare", tiny_latte, "--runtimes", "ort:fp32", "--null", null, "--seq", f"1:{SEQ}"]
    for extra, needle in ((["--cond", write_cond(tmp_path / "long.safetensors", encoder_hidden_states=prompts(1))],
                           "same length"), ([], "pass --cond")):
        result = run_cli(*common, *extra, "--out", tmp_path / "refused")
        assert_one_line_error(result, needle)
        assert not (tmp_path / "refused").exists()
    result = run_cli(*common, "--cond", short, "--steps", 2, "--batch", 1, "--seeds", 0, "--repeats", 1,
                     "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    ort = next(r for r in report["results"] if r["label"] == "ort:fp32")
    assert report["reference"] == "torch:fp32" and ort["accuracy"]["psnr_db"] > 60   # both with the same null
