"""TensorRT on a real GPU: builds, the cache, and agreement with the PyTorch fp32 reference.
Skipped with the reason where there is no NVIDIA GPU, TensorRT or cuda-python (benchmarks/gpu_check.sh
installs them and runs `pytest -m gpu`)."""
import numpy as np
import pytest

from conftest import open_built, trt_skip_reason

REASON = trt_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


def rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def export_dir(tiny_checkpoint, tmp_path_factory):
    from vdit_deploy.export.onnx_export import export_checkpoint

    return export_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("trt") / "export", batch=(1, 8))


def test_build_cache_reuse_and_refusal(export_dir):
    from vdit_deploy.errors import VditError
    from vdit_deploy.runtimes.engine_cache import AxisProfile, EngineProfile
    from vdit_deploy.runtimes.trt_build import ensure_engine

    profile = EngineProfile.of(AxisProfile(1, 2, 4))
    engine, built = ensure_engine(export_dir, "step", "fp32", profile, progress=False)
    assert built and engine.path.stat().st_size > 0
    again, built = ensure_engine(export_dir, "step", "fp32", profile, progress=False)
    assert not built and again.path == engine.path
    assert (export_dir / "engines" / "timing.cache").stat().st_size > 0
    with pytest.raises(VditError, match="profile: cached 1:2:4, now 1:1:2"):
        ensure_engine(export_dir, "step", "fp32", EngineProfile.of(AxisProfile(1, 1, 2)), build=False)


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-3), ("fp16", 3e-2)])
def test_denoise_matches_torch(export_dir, tiny_checkpoint, precision, tol):
    from vdit_deploy.runtimes import open_runtime

    rng = np.random.default_rng(0)
    with open_runtime("torch", tiny_checkpoint, precision="fp32") as ref:
        x = rng.standard_normal((2, *ref.contract.latent), dtype=np.float32)
        t, cond = np.array([10, 700], np.float32), {"y": np.array([0, 3], np.int32)}
        want = ref.denoise(x, t, cond)
    with open_built(export_dir, precision) as rt:
        assert rel_l2(rt.denoise(x, t, cond), want) < tol


@pytest.mark.parametrize("eta", [0.0, 1.0])   # deterministic DDIM, and stochastic steps (noise uploads)
def test_sample_matches_torch_with_and_without_cuda_graph(export_dir, tiny_checkpoint, eta):
    from vdit_deploy.samplers import make_steps
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import sample

    with open_runtime("torch", tiny_checkpoint, precision="fp32") as ref:
        steps = make_steps(ref.schedule, "ddim", 10, eta)
        want = sample(ref, ref.contract, [0, 1], steps, guidance=2.0, seed=3)
    outs = {}
    for graph in (True, False):
        with open_built(export_dir, "fp32", cuda_graph=graph) as rt:
            outs[graph] = sample(rt, rt.contract, [0, 1], steps, guidance=2.0, seed=3)
            assert rt.cuda_graph == graph, rt.describe()
    np.testing.assert_array_equal(outs[True], outs[False])
    assert rel_l2(outs[True], want) < 1e-3


def test_ort_trt_runtime(export_dir, tiny_checkpoint):
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with the TensorRT execution provider is not installed")
    from vdit_deploy.runtimes import open_runtime

    rng = np.random.default_rng(1)
    with open_runtime("torch", tiny_checkpoint) as ref:
        x = rng.standard_normal((1, *ref.contract.latent), dtype=np.float32)
        t, cond = np.array([500], np.float32), {"y": np.array([2], np.int32)}
        want = ref.denoise(x, t, cond)
    with open_runtime("ort-trt", export_dir) as rt:
        assert rel_l2(rt.denoise(x, t, cond), want) < 1e-3


def test_text_export_matches_torch(tiny_latte, tiny_latte_export, tmp_path):
    """A text-conditioned, learned-sigma export (diffusers Latte) on TensorRT fp32: denoise at a shorter
    prompt than the profile's opt, and a guided sample (null_encoder_hidden_states from the export),
    against PyTorch on the same noise and conditioning."""
    import shutil

    from vdit_deploy.samplers import make_steps
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import sample

    export = shutil.copytree(tiny_latte_export, tmp_path / "latte")
    rng = np.random.default_rng(2)
    with open_runtime("torch", tiny_latte, precision="fp32") as ref:
        seq = ref.null["encoder_hidden_states"].shape[1]
        x = rng.standard_normal((2, *ref.contract.latent), dtype=np.float32)
        short = {"encoder_hidden_states": rng.standard_normal((2, 5, 32), dtype=np.float32)}
        full = {"encoder_hidden_states": rng.standard_normal((2, seq, 32), dtype=np.float32)}
        t = np.array([10, 700], np.float32)
        want = ref.denoise(x, t, short)
        steps = make_steps(ref.schedule, "ddim", 8, prediction=ref.contract.prediction)
        want_video = sample(ref, ref.contract, full, steps, guidance=2.0, seed=4)
    with open_built(export, "fp32") as rt:
        got = rt.denoise(x, t, short)
        assert got.shape == want.shape == (2, 8, *ref.contract.latent[1:]) and rel_l2(got, want) < 1e-3
        assert rel_l2(sample(rt, rt.contract, full, steps, guidance=2.0, seed=4), want_video) < 1e-3
