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
    (["--checkpoint", "missing-dir"], "checkpoint missing-dir is not a directory"),
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
