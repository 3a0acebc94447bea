"""ONNX Runtime backend: same numbers as PyTorch, a torch-free `vdit sample`, one-line errors."""
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from vdit_deploy.samplers import guided_step, make_steps
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
    assert [s.name for s in ort_rt.inputs] == ["x_t", "t", "y"] and [s.name for s in ort_rt.outputs] == ["out"]
    assert ort_rt.inputs[0].shape[1:] == ort_rt.contract.video_shape and ort_rt.inputs[2].dtype == "int32"
    assert ort_rt.contract.output == "eps" and ort_rt.null["y"].tolist() == [ort_rt.contract.cond[0].classes]
    assert ort_rt.describe() == "ort:fp32 on CPU (fused step)"


@pytest.mark.parametrize("guidance", [2.0, 1.0])
def test_fused_step_equals_host_guided_step(runtimes, guidance):
    ort_rt, torch_rt = runtimes
    rng = np.random.default_rng(1)
    contract = ort_rt.contract
    x = rng.standard_normal((3, *contract.video_shape), dtype=np.float32)
    cond, noise = contract.labels([0, 2, 3]), rng.standard_normal(x.shape, dtype=np.float32)
    null = contract.null_batch(ort_rt.null, cond) if guidance != 1.0 else None
    for step in make_steps(ort_rt.schedule, "ddim", 5, eta=1.0):      # sigma > 0: the noise input counts
        got = ort_rt.step(x, step.t, cond, guidance, step.coefs, noise)
        ref = guided_step(torch_rt.denoise, x, step.t, cond, null, guidance, step.coefs, noise)
        same_backend = guided_step(ort_rt.denoise, x, step.t, cond, null, guidance, step.coefs, noise)
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
    ref = sample(torch_rt, torch_rt.contract, [0, 3], plan, guidance=2.0, seed=7)
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
    contract = ort_rt.contract
    x = np.zeros((2, *contract.video_shape), np.float32)
    t, y = np.zeros(2, np.float32), {"y": np.zeros(2, np.int32)}
    with pytest.raises(VditError, match=r"x_t has shape \(2, 3, 8, 8, 16\), expected \(batch, 3, 8, 16, 16\)"):
        ort_rt.denoise(x[:, :, :, :8], t, y)
    with pytest.raises(VditError, match=r"t must have shape \(2,\)"):
        ort_rt.denoise(x, t[:1], y)
    with pytest.raises(VditError, match=r"y has batch = 1 where the rest has 2 \(y: int32\(batch\)"):
        ort_rt.denoise(x, t, {"y": np.zeros(1, np.int32)})
    with pytest.raises(VditError, match="lacks y and has unknown label: the model takes y: int32"):
        ort_rt.denoise(x, t, {"label": np.zeros(2, np.int32)})
    with pytest.raises(VditError, match=r"y is float32\[2\], the model takes y: int32\(batch\)"):
        ort_rt.denoise(x, t, {"y": np.zeros(2, np.float32)})
    with pytest.raises(VditError, match="y holds labels outside 0..4"):
        ort_rt.denoise(x, t, {"y": np.array([0, 5], np.int32)})
    big = np.zeros((9, *contract.video_shape), np.float32)
    with pytest.raises(VditError, match=r"batch 9 is outside what denoiser.onnx was exported for \(1..8\)"):
        ort_rt.denoise(big, np.zeros(9, np.float32), {"y": np.zeros(9, np.int32)})
    coefs = make_steps(ort_rt.schedule, "ddim", 5)[0].coefs
    with pytest.raises(VditError, match=r"batch 5 is outside what step.onnx was exported for \(1..4\)"):
        ort_rt.step(big[:5], 10, {"y": np.zeros(5, np.int32)}, 2.0, coefs, big[:5])
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


# ---- a text-conditioned, learned-sigma model (diffusers Latte) through the contract -------------------
@pytest.fixture(scope="module")
def latte_runtimes(tiny_latte_export):
    """ORT on the Latte export, and PyTorch on the model it was exported from with the export's contract
    and null conditioning (what `vdit verify` compares)."""
    from vdit_deploy.export.metadata import find_onnx, read_metadata
    from vdit_deploy.runtimes.torch_runtime import TorchRuntime
    from vdit_deploy.sources import load_export_source

    meta = read_metadata(find_onnx(tiny_latte_export))
    source = load_export_source(meta, tiny_latte_export)
    with open_runtime("ort", tiny_latte_export) as ort_rt, \
            TorchRuntime(source.path, device="cpu", source=source) as torch_rt:
        yield ort_rt, torch_rt


def test_latte_export_carries_its_text_contract(latte_runtimes):
    ort_rt, torch_rt = latte_runtimes
    contract = ort_rt.contract
    assert contract == torch_rt.contract and contract.output == "eps+var" and contract.out_channels == 8
    assert contract.names == ("encoder_hidden_states",) and contract.axes == {"seq": (1, 16)}
    assert ort_rt.describe() == "ort:fp32 on CPU (fused step)"
    assert [s.name for s in ort_rt.inputs] == ["x_t", "t", "encoder_hidden_states"]
    assert ort_rt.null["encoder_hidden_states"].shape == (1, 16, 32)
    with pytest.raises(VditError, match="not on class labels"):
        contract.labels([0])


@pytest.mark.parametrize("sampler", ["ddim", "unipc", "ddpm-learned-variance"])
def test_latte_ort_fused_step_samples_what_torch_samples(latte_runtimes, sampler):
    """Same noise and text conditioning: ORT's fused step.onnx (guidance in the graph, the null embeddings
    as null_encoder_hidden_states) samples PyTorch's video; the DDPM steps use the learned variance."""
    from vdit_deploy.samplers import COEF_NAMES

    ort_rt, torch_rt = latte_runtimes
    contract = ort_rt.contract
    if sampler == "ddpm-learned-variance":
        plan = make_steps(contract.schedule, "ddpm", prediction=contract.prediction, learned_variance=True)[-5:]
        assert plan[0].coefs[COEF_NAMES.index("learned_var")] == 1 and all(s.stochastic for s in plan[:-1])
    else:
        plan = make_steps(contract.schedule, sampler, 6, prediction=contract.prediction)
    cond = contract.example_cond(2, np.random.default_rng(3), {"seq": 16})   # the null's length
    ort_video = sample(ort_rt, contract, cond, plan, guidance=3.0, seed=5)
    torch_video = sample(torch_rt, contract, cond, plan, guidance=3.0, seed=5)
    host_video = sample(torch_rt.denoise, contract, cond, plan, guidance=3.0, seed=5, null=torch_rt.null)
    assert rel_l2(ort_video, torch_video) < 1e-4 and rel_l2(torch_video, host_video) < 1e-4
    if sampler == "ddpm-learned-variance":   # the learned std is used: the posterior's fixed one samples another video
        fixed = make_steps(contract.schedule, "ddpm", prediction=contract.prediction)[-5:]
        assert rel_l2(sample(ort_rt, contract, cond, fixed, guidance=3.0, seed=5), ort_video) > 1e-3


def test_latte_unguided_sampling_takes_any_text_length_in_range(latte_runtimes):
    """Without guidance no null pass: the seq axis is dynamic (7 tokens here), ORT matches PyTorch."""
    ort_rt, torch_rt = latte_runtimes
    contract = ort_rt.contract
    plan = make_steps(contract.schedule, "ddim", 4, prediction=contract.prediction)
    cond = contract.example_cond(3, np.random.default_rng(0), {"seq": 7})
    got, ref = (sample(rt, contract, cond, plan, guidance=1.0, seed=1) for rt in (ort_rt, torch_rt))
    assert got.shape == (3, 4, 2, 8, 8) and rel_l2(got, ref) < 1e-4
    with pytest.raises(VditError, match="pad to max_length"):       # guidance pairs it with the 16-token null
        sample(ort_rt, contract, cond, plan, guidance=2.0, seed=1)
    with pytest.raises(VditError, match="seq = 17, outside 1..16"):
        sample(ort_rt, contract, contract.example_cond(1, np.random.default_rng(0), {"seq": 17}), plan)
