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
    from vdit_deploy.runtimes.engine_cache import BatchProfile
    from vdit_deploy.runtimes.trt_build import ensure_engine

    engine, built = ensure_engine(export_dir, "step", "fp32", BatchProfile(1, 2, 4), progress=False)
    assert built and engine.path.stat().st_size > 0
    again, built = ensure_engine(export_dir, "step", "fp32", BatchProfile(1, 2, 4), progress=False)
    assert not built and again.path == engine.path
    assert (export_dir / "engines" / "timing.cache").stat().st_size > 0
    with pytest.raises(VditError, match="profile: cached 1:2:4, now 1:1:2"):
        ensure_engine(export_dir, "step", "fp32", BatchProfile(1, 1, 2), build=False)


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-3), ("fp16", 3e-2)])
def test_denoise_matches_torch(export_dir, tiny_checkpoint, precision, tol):
    from vdit_deploy.runtimes import open_runtime

    rng = np.random.default_rng(0)
    with open_runtime("torch", tiny_checkpoint, precision="fp32") as ref:
        cfg = ref.config
        x = rng.standard_normal((2, *cfg.video_shape), dtype=np.float32)
        t, y = np.array([10, 700], np.float32), np.array([0, 3], np.int32)
        want = ref.denoise(x, t, y)
    with open_built(export_dir, precision) as rt:
        assert rel_l2(rt.denoise(x, t, y), want) < tol


@pytest.mark.parametrize("eta", [0.0, 1.0])   # deterministic DDIM, and stochastic steps (noise uploads)
def test_sample_matches_torch_with_and_without_cuda_graph(export_dir, tiny_checkpoint, eta):
    from vdit_deploy.diffusion import make_steps
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import sample

    with open_runtime("torch", tiny_checkpoint, precision="fp32") as ref:
        steps = make_steps(ref.schedule, "ddim", 10, eta)
        want = sample(ref, ref.config, [0, 1], steps, guidance=2.0, seed=3)
    outs = {}
    for graph in (True, False):
        with open_built(export_dir, "fp32", cuda_graph=graph) as rt:
            outs[graph] = sample(rt, rt.config, [0, 1], steps, guidance=2.0, seed=3)
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
        x = rng.standard_normal((1, *ref.config.video_shape), dtype=np.float32)
        t, y = np.array([500], np.float32), np.array([2], np.int32)
        want = ref.denoise(x, t, y)
    with open_runtime("ort-trt", export_dir) as rt:
        assert rel_l2(rt.denoise(x, t, y), want) < 1e-3
