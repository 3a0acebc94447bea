import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from vdit_deploy.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_info_lists_presets_with_flops():
    result = run("info")
    assert result.exit_code == 0
    assert "S " in result.output and "126.01" in result.output and "XL" in result.output


def test_info_on_checkpoint(tiny_checkpoint):
    from vdit_deploy.config import preset
    result = run("info", tiny_checkpoint)
    assert result.exit_code == 0 and f"params      {preset('tiny').num_params():,}" in result.output


@pytest.mark.parametrize("suffix", [".npy", ".gif", ".mp4"])
def test_sample_writes_what_the_suffix_names(tiny_checkpoint, tmp_path, suffix):
    out = tmp_path / f"v{suffix}"
    result = run("sample", "--checkpoint", tiny_checkpoint, "--steps", 3, "--label", "1,2", "--out", out)
    assert result.exit_code == 0, result.output
    if suffix == ".npy":
        assert np.load(out).shape == (2, 3, 8, 16, 16)
    else:
        import imageio.v3 as iio
        frames = iio.imread(out)
        assert frames.shape[0] == 8 and frames.shape[-1] == 3
    assert not list(tmp_path.glob(".*tmp*"))                  # no temp files left behind


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "missing-dir"], "missing-dir is not a model directory"),
    (["--label", "9"], "label 9 is out of range"),
    (["--label", "x"], "--label takes integers"),
    (["--steps", "0"], "steps must be between 1 and 1000"),
    (["--steps", "5000"], "steps must be between 1 and 1000"),
    (["--out", "video.avi"], "the suffix must be one of"),
    (["--runtime", "nope"], "unknown runtime 'nope'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message, tiny_checkpoint):
    out = tmp_path / "v.gif"
    base = ["sample", "--checkpoint", tiny_checkpoint, "--steps", 2, "--out", out]
    result = run(*base, *args)
    assert result.exit_code == 1, result.output
    assert message in result.output and result.output.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_non_divisible_sizes_in_a_checkpoint(tiny_checkpoint, tmp_path):
    import json
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    meta = json.loads((bad / "config.json").read_text())
    meta["model"]["frames"] = 7
    (bad / "config.json").write_text(json.dumps(meta))
    result = run("sample", "--checkpoint", bad, "--out", tmp_path / "v.gif")
    assert result.exit_code == 1 and "frames=7 is not divisible by the tubelet size 2" in result.output


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vdit_deploy.cli", "sample", "--label", "12",
                           "--out", str(tmp_path / "v.gif")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: label 12 is out of range")
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


def test_demo_writes_a_gif_grid(tmp_path):
    out = tmp_path / "demo.gif"
    result = run("demo", "--out", out, "--steps", 4, "--seeds", 1)
    assert result.exit_code == 0, result.output
    import imageio.v3 as iio
    frames = iio.imread(out)
    assert frames.shape[0] == 8 and frames.shape[2] > 3 * frames.shape[1]   # 4 classes side by side


def test_outputs_never_replace_a_foreign_directory(tiny_checkpoint, tmp_path):
    """`--out` pointing at a source folder must not swallow it: only an earlier artifact is replaced."""
    foreign = tmp_path / "src"
    foreign.mkdir()
    (foreign / "keep.py").write_text("x = 1\n")
    result = run("train", "--steps", 1, "--batch-size", 2, "--out", foreign)
    assert result.exit_code == 1 and "refusing to replace" in result.output
    assert (foreign / "keep.py").read_text() == "x = 1\n" and len(list(foreign.iterdir())) == 1


def test_sample_cond_file_of_a_text_model(tiny_latte_export, tmp_path):
    """`vdit sample --cond FILE.safetensors` on a text-conditioned export gives what sample() gives on the
    same embeddings; a file that breaks the contract, or --label for a text model, is one line naming it."""
    from safetensors.numpy import save_file

    from vdit_deploy.samplers import make_steps
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import sample

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((2, 16, 32)).astype(np.float32)
    save_file({"encoder_hidden_states": emb}, str(tmp_path / "cond.safetensors"))
    out = tmp_path / "v.npy"
    base = ["sample", "--runtime", "ort", "--onnx", tiny_latte_export, "--sampler", "ddim", "--steps", 3,
            "--seed", 4]
    result = run(*base, "--cond", tmp_path / "cond.safetensors", "--out", out)
    assert result.exit_code == 0, result.output
    with open_runtime("ort", tiny_latte_export) as rt:
        plan = make_steps(rt.schedule, "ddim", 3, prediction=rt.contract.prediction)
        ref = sample(rt, rt.contract, {"encoder_hidden_states": emb}, plan, guidance=2.0, seed=4)
    np.testing.assert_array_equal(np.load(out), ref)
    assert ref.shape == (2, 4, 2, 8, 8)

    save_file({"prompt_embeds": emb}, str(tmp_path / "wrong_name.safetensors"))
    save_file({"encoder_hidden_states": emb[:, :, :8].copy()}, str(tmp_path / "wrong_width.safetensors"))
    save_file({"encoder_hidden_states": emb.astype(np.int32)}, str(tmp_path / "wrong_dtype.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    for args, message in (
            (["--cond", tmp_path / "wrong_name.safetensors"], "lacks encoder_hidden_states and has unknown prompt_embeds"),
            (["--cond", tmp_path / "wrong_width.safetensors"], "has 8 at axis 2, the model takes encoder_hidden_states: "
                                                               "float32(batch, seq, 32)"),
            (["--cond", tmp_path / "wrong_dtype.safetensors"], "is int32[2, 16, 32], the model takes"),
            (["--cond", tmp_path / "junk.safetensors"], "is not a readable safetensors file"),
            (["--cond", tmp_path / "missing.safetensors"], "no such conditioning file"),
            (["--label", "1"], "this model is conditioned on encoder_hidden_states: float32(batch, seq, 32)")):
        result = run(*base, *args, "--out", tmp_path / "bad.npy")
        assert result.exit_code == 1 and result.output.startswith("Error: ") and message in result.output, result.output
        assert result.output.count("\n") == 1 and not (tmp_path / "bad.npy").exists()
