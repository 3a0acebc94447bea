"""ONNX Runtime backend: same numbers as PyTorch, a torch-free `vdit sample`, one-line errors."""
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from vdit_deploy.diffusion import guided_step, make_steps
from vdit_deploy.errors import VditError
from vdit_deploy.runtimes import open_runtime
from vdit_deploy.runtimes.ort_runtime import OrtRuntime
from vdit_deploy.sampling import sample


def rel_l2(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def runtimes(tiny_export, tiny_checkpoint):
    with open_runtime("ort", tiny_export) as ort_rt, open_runtime("torch", tiny_checkpoint, device="cpu") as torch_rt:
        yield ort_rt, torch_rt


def test_runtime_interface(runtimes):
    ort_rt, _ = runtimes
    assert isinstance(ort_rt, OrtRuntime) and [f.name for f in ort_rt.files] == ["denoiser.onnx", "step.onnx"]
    assert [s.name for s in ort_rt.inputs] == ["x_t", "t", "y"] and ort_rt.outputs[0].name == "eps"
    assert ort_rt.inputs[0].shape[1:] == ort_rt.config.video_shape and ort_rt.inputs[2].dtype == "int32"
    assert ort_rt.describe() == "ort:fp32 on CPU (fused step)"


@pytest.mark.parametrize("guidance", [2.0, 1.0])
def test_fused_step_equals_host_guided_step(runtimes, guidance):
    ort_rt, torch_rt = runtimes
    rng = np.random.default_rng(1)
    cfg = ort_rt.config
    x = rng.standard_normal((3, *cfg.video_shape), dtype=np.float32)
    y, noise = np.array([0, 2, 3], np.int32), rng.standard_normal(x.shape, dtype=np.float32)
    for step in make_steps(ort_rt.schedule, "ddim", 5, eta=1.0):      # sigma > 0: the noise input counts
        got = ort_rt.step(x, step.t, y, guidance, step.coefs, noise)
        ref = guided_step(torch_rt.denoise, x, step.t, y, guidance, step.coefs, noise, cfg.null_label)
        same_backend = guided_step(ort_rt.denoise, x, step.t, y, guidance, step.coefs, noise, cfg.null_label)
        assert rel_l2(got, ref) < 1e-5 and rel_l2(got, same_backend) < 1e-6


def test_sample_cli_without_torch_matches_torch(tiny_export, runtimes, tmp_path):
    """`vdit sample --runtime ort` where `import torch` fails gives the PyTorch runtime's video."""
    out = tmp_path / "ort.npy"
    code = ("import sys; sys.modules['torch'] = None\n"          # `import torch` now raises ImportError
            "from vdit_deploy.cli import main\n"
            f"main(['sample', '--runtime', 'ort', '--onnx', {str(tiny_export)!r}, '--label', '0,3',"
            f" '--sampler', 'ddim', '--steps', '10', '--eta', '0.5', '--seed', '7', '--out', {str(out)!r}])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "ort:fp32 on CPU (fused step)" in run.stdout
    _, torch_rt = runtimes
    plan = make_steps(torch_rt.schedule, "ddim", 10, eta=0.5)
    ref = sample(torch_rt, torch_rt.config, [0, 3], plan, guidance=2.0, seed=7)
    assert rel_l2(np.load(out), ref) < 1e-4


def test_torch_free_import_is_really_torch_free():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from vdit_deploy.runtimes import open_runtime\nimport vdit_deploy.runtimes.ort_runtime, vdit_deploy.cli\n"
            "import vdit_deploy.export.metadata, vdit_deploy.sampling\n"
            "try:\n    open_runtime('torch', '.')\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
            "try:\n    vdit_deploy.cli.main(['export', '.', '--out', 'x'])\nexcept SystemExit as e:\n"
            "    print('exit', e.code)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "VditError runtime 'torch' needs torch" in run.stdout and "exit 1" in run.stdout
    assert run.stderr.strip() == "Error: vdit export needs torch: pip install 'vdit-deploy[torch]' (sampling an export does not)"


def test_bad_inputs_give_one_line_errors(runtimes, tiny_export, tmp_path):
    ort_rt, _ = runtimes
    cfg = ort_rt.config
    x = np.zeros((2, *cfg.video_shape), np.float32)
    t, y = np.zeros(2, np.float32), np.zeros(2, np.int32)
    with pytest.raises(VditError, match=r"x_t has shape \(2, 3, 8, 8, 16\), expected \(batch, 3, 8, 16, 16\)"):
        ort_rt.denoise(x[:, :, :, :8], t, y)
    with pytest.raises(VditError, match="t and y must have shape"):
        ort_rt.denoise(x, t[:1], y)
    big = np.zeros((9, *cfg.video_shape), np.float32)
    with pytest.raises(VditError, match=r"batch 9 is outside what denoiser.onnx was exported for \(1..8\)"):
        ort_rt.denoise(big, np.zeros(9, np.float32), np.zeros(9, np.int32))
    coefs = make_steps(ort_rt.schedule, "ddim", 5)[0].coefs
    with pytest.raises(VditError, match=r"batch 5 is outside what step.onnx was exported for \(1..4\)"):
        ort_rt.step(big[:5], 10, np.zeros(5, np.int32), 2.0, coefs, big[:5])
    with pytest.raises(VditError, match="CUDAExecutionProvider is not available here"):
        OrtRuntime(tiny_export, providers=["cuda"])

    plain = tmp_path / "plain.onnx"     # a valid ONNX model that is not a vdit export
    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(plain))
    with pytest.raises(VditError, match="is not a vdit export"):
        OrtRuntime(plain)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(VditError, match="is not an ONNX model"):
        OrtRuntime(tmp_path / "junk.onnx")
    with pytest.raises(VditError, match="is a fused step graph"):
        OrtRuntime(tiny_export / "step.onnx")
    with pytest.raises(VditError, match="has no denoiser.onnx"):
        OrtRuntime(tmp_path)


def test_cli_sample_ort_errors_are_one_line(tiny_export, tmp_path):
    from click.testing import CliRunner

    from vdit_deploy.cli import main
    runner = CliRunner()
    result = runner.invoke(main, ["sample", "--runtime", "ort", "--out", str(tmp_path / "a.npy")])
    assert result.exit_code == 1 and "pass --onnx DIR" in result.output
    result = runner.invoke(main, ["sample", "--runtime", "ort", "--onnx", str(tiny_export), "--label", "0,1,2,3,0",
                                  "--steps", "2", "--out", str(tmp_path / "a.npy")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "batch 5 is outside" in result.output


def test_ort_trt_without_the_provider_is_one_line_and_leaves_the_environment_alone(tiny_export):
    import os

    before = dict(os.environ)
    with pytest.raises(VditError, match="TensorrtExecutionProvider is not available here"):
        open_runtime("ort-trt", tiny_export, precision="fp16")
    assert dict(os.environ) == before


def test_provider_options_ride_with_the_provider():
    from vdit_deploy.runtimes.ort_runtime import resolve_providers

    assert resolve_providers(["cpu"], {"CPUExecutionProvider": {"x": "1"}}) == [("CPUExecutionProvider", {"x": "1"})]
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
