"""Thread control and progress (issue 26): one count reaches torch and ONNX Runtime alike, the default
does not oversubscribe a busy machine, progress goes to stderr only when asked or on a terminal."""
import json
import subprocess
import sys

import numpy as np
import pytest

from vdit_deploy import threads
from vdit_deploy.progress import bar, shown


@pytest.mark.parametrize("cores,load,expected", [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.7, 1), (2, 7.5, 1),
                                                 (16, 3.2, 13), (1, 0.0, 1)])
def test_default_is_the_cores_not_already_busy(cores, load, expected):
    assert threads.default_threads(cores, load) == expected


def test_oversubscription_warns_in_one_line():
    assert threads.oversubscribed(2, 2, 0.3) is None
    assert threads.oversubscribed(1, 2, 1.4) is None
    warning = threads.oversubscribed(2, 2, 3.0)
    assert warning.startswith("warning:") and "\n" not in warning and "--threads 1" in warning
    assert "oversubscribed" in threads.oversubscribed(1, 2, 4.0)   # even one thread: say why it is slow


# Run in a fresh process: the count is process-wide (torch's pools, and every ORT session after it).
PROBE = r"""
import json, sys
from click.testing import CliRunner
from vdit_deploy.cli import main
from vdit_deploy import threads
args = json.loads(sys.argv[1])
result = CliRunner().invoke(main, args)
assert result.exit_code == 0, result.output
torch_loaded = "torch" in sys.modules
import torch
from vdit_deploy.runtimes.ort_runtime import OrtRuntime
options = OrtRuntime(sys.argv[2]).graph.session.get_session_options()
print(json.dumps({"torch": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                  "intra": options.intra_op_num_threads, "inter": options.inter_op_num_threads,
                  "count": threads.count(), "output": result.output, "torch_loaded": torch_loaded}))
"""


def probe(args, export):
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps([str(a) for a in args]), str(export)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_threads_option_reaches_torch_and_onnxruntime(tiny_export, tmp_path):
    got = probe(["sample", "--threads", "3", "--steps", "2", "--label", "1", "--out", tmp_path / "v.npy"], tiny_export)
    assert (got["torch"], got["interop"], got["intra"], got["inter"]) == (3, 3, 3, 3)
    assert "3 CPU thread(s)" in got["output"]
    got = probe(["sample", "--runtime", "ort", "--onnx", tiny_export, "--threads", "2", "--steps", "2",
                 "--out", tmp_path / "o.npy"], tiny_export)
    assert (got["intra"], got["inter"]) == (2, 2) and not got["torch_loaded"]   # ORT alone: torch stays out


def test_default_threads_reach_both_without_the_option(tiny_export, tmp_path):
    got = probe(["sample", "--steps", "2", "--out", tmp_path / "v.npy"], tiny_export)
    assert 1 <= got["count"] <= threads.cores()
    assert got["torch"] == got["intra"] == got["count"]


def test_progress_only_when_shown(monkeypatch, capsys):
    monkeypatch.setenv("VDIT_PROGRESS", "0")
    assert not shown()
    list(bar(range(3), desc="quiet"))
    assert "quiet" not in capsys.readouterr().err
    monkeypatch.setenv("VDIT_PROGRESS", "1")
    assert shown()
    list(bar(range(3), desc="loud"))
    list(bar(range(3), show=False, desc="hidden"))
    err = capsys.readouterr().err
    assert "loud" in err and "hidden" not in err


def test_verify_reports_its_stages(tiny_export, monkeypatch, capsys):
    from vdit_deploy.export.verify import verify

    monkeypatch.setenv("VDIT_PROGRESS", "1")
    report = verify(tiny_export, batches=(1,), num_steps=3, picks=2, polygraphy=False, progress=True)
    err = capsys.readouterr()
    assert report.ok and "verify 1/2" in err.err and "verify 2/2" in err.err and err.out == ""


def test_gif_columns_carry_their_titles():
    from vdit_deploy.video import to_frames

    videos = np.zeros((2, 3, 2, 16, 16), np.float32)
    plain = to_frames(videos, columns=2)
    titled = to_frames(videos, columns=2, titles=["torch:fp32", "ort:int8"])
    band = titled.shape[1] - plain.shape[1]
    assert band > 8 and np.array_equal(titled[:, band:], plain)
    head = titled[0, :band]
    left, right = head[:, :plain.shape[2] // 2], head[:, plain.shape[2] // 2:]
    assert (left < 128).any() and (right < 128).any()                       # text over each column
    other = to_frames(videos, columns=2, titles=["torch:fp32", "ort:fp16"])
    assert np.array_equal(other[0, :band, :plain.shape[2] // 2], left) and not np.array_equal(other[0, :band], head)


def test_sizes_print_as_people_read_them():
    from vdit_deploy.cli.app import human_size

    assert [human_size(n) for n in (68, 3400, 7_500_000, 2_100_000_000)] == ["68 B", "3.4 kB", "7.5 MB", "2.1 GB"]
