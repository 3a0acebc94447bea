"""The GPU runtimes that run without TensorRT: PyTorch on CUDA (eager and torch.compile with CUDA
graphs) and ONNX Runtime's CUDA provider with the fused step bound on the device. Marked `gpu`:
skipped where there is no NVIDIA GPU; benchmarks/gpu_check.sh runs them."""
import numpy as np
import pytest

from vdit_deploy.samplers import make_steps
from vdit_deploy.metrics import psnr, rel_l2
from vdit_deploy.runtimes import open_runtime
from vdit_deploy.sampling import sample

pytestmark = pytest.mark.gpu


def ort_cuda_skip_reason():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider: pip uninstall onnxruntime && pip install onnxruntime-gpu"
    return None


def inputs(contract, b=2, seed=0):
    """x_t, t and the conditioning (labels of the built-in model) of a runtime's contract."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, *contract.latent), dtype=np.float32)
    return x, np.full(b, 500, np.float32), contract.example_cond(b, rng)


def test_torch_cuda_matches_cpu_and_keeps_the_video_on_the_gpu(tiny_checkpoint):
    from vdit_deploy.runtimes.torch_runtime import TorchDeviceArray

    with open_runtime("torch", tiny_checkpoint, device="cpu") as cpu, \
            open_runtime("torch", tiny_checkpoint, device="cuda") as gpu:
        x, t, y = inputs(cpu.contract)
        assert rel_l2(gpu.denoise(x, t, y), cpu.denoise(x, t, y)) < 1e-3   # cuDNN may use TF32 convs
        steps = make_steps(cpu.schedule, "ddim", 8)
        step = steps[3]
        out = gpu.step(x, step.t, y, 2.0, step.coefs, np.zeros_like(x))
        assert isinstance(out, TorchDeviceArray) and out.tensor.is_cuda
        ref = sample(cpu, cpu.contract, [0, 1], steps, guidance=2.0, seed=3)
        got = sample(gpu, gpu.contract, [0, 1], steps, guidance=2.0, seed=3)
        assert psnr(got, ref) > 50


def test_torch_compile_cuda_graphs_match_eager(tiny_checkpoint):
    """reduce-overhead replays a CUDA graph whose output buffer the next replay overwrites: the runtime
    hands back copies, so an earlier step's video must survive later steps unchanged."""
    with open_runtime("torch", tiny_checkpoint, precision="fp16", device="cuda") as eager, \
            open_runtime("torch", tiny_checkpoint, precision="fp16", device="cuda", compile="reduce-overhead") as graph:
        steps = make_steps(eager.schedule, "ddim", 6)
        x, _, y = inputs(eager.contract)
        first = graph.step(x, steps[0].t, y, 2.0, steps[0].coefs, np.zeros_like(x))
        kept = np.asarray(first).copy()
        second = graph.step(first, steps[1].t, y, 2.0, steps[1].coefs, np.zeros_like(x))
        assert np.array_equal(np.asarray(first), kept) and not np.array_equal(np.asarray(second), kept)
        ref = sample(eager, eager.contract, [0, 3], steps, guidance=2.0, seed=1)
        got = sample(graph, graph.contract, [0, 3], steps, guidance=2.0, seed=1)
        assert np.isfinite(got).all() and psnr(got, ref) > 40


@pytest.mark.parametrize("precision,min_psnr", [("fp32", 60.0), ("fp16", 30.0)])
def test_ort_cuda_fused_step_stays_on_device_and_matches_cpu(tiny_export, precision, min_psnr):
    reason = ort_cuda_skip_reason()
    if reason:
        pytest.skip(reason)
    from vdit_deploy.calibration.fp16 import convert_fp16
    from vdit_deploy.runtimes.ort_runtime import DeviceArray

    if precision == "fp16" and not (tiny_export / "step.fp16.onnx").is_file():
        convert_fp16(tiny_export)
    with open_runtime("ort", tiny_export, providers=["cpu"]) as cpu, \
            open_runtime("ort", tiny_export, precision=precision, providers=["cuda"]) as gpu:
        assert gpu.files[-1].name.startswith("step.")              # the fused step graph: on the GPU below
        x, _, y = inputs(cpu.contract)
        steps = make_steps(cpu.schedule, "ddim", 8)
        out = gpu.step(x, steps[0].t, y, 2.0, steps[0].coefs, np.zeros_like(x))
        assert isinstance(out, DeviceArray)
        out = gpu.step(out, steps[1].t, y, 2.0, steps[1].coefs, np.zeros_like(x))   # bound in place
        ref = sample(cpu, cpu.contract, [0, 2], steps, guidance=2.0, seed=5)
        got = sample(gpu, gpu.contract, [0, 2], steps, guidance=2.0, seed=5)
        assert psnr(got, ref) > min_psnr


@pytest.fixture(scope="module")
def latte_fixed2(tiny_latte, tmp_path_factory):
    """tiny_latte exported with a fixed batch of 2 (token count dynamic): torch 2.11 (the H100 image) traces
    diffusers' Latte with its batch static, torch 2.13 keeps it dynamic (tests/test_own_model.py)."""
    from vdit_deploy.export.onnx_export import export_checkpoint

    return export_checkpoint(tiny_latte, tmp_path_factory.mktemp("gpu") / "latte", fixed=2, seq=(1, 16))


@pytest.mark.parametrize("runtime", ["torch", "ort"])
def test_text_conditioned_learned_sigma_model_on_cuda_matches_cpu(latte_fixed2, runtime):
    """The tiny diffusers Latte (text embeddings, eps + learned variance) on the GPU: torch CUDA (the
    export's source with its contract and null) and ORT's CUDA provider with the fused step bound on the
    device, against ONNX Runtime on the CPU; unipc, and DDPM's learned-variance steps."""
    from vdit_deploy.export.metadata import find_onnx, read_metadata
    from vdit_deploy.runtimes.torch_runtime import TorchRuntime
    from vdit_deploy.sources import load_export_source

    if runtime == "ort" and ort_cuda_skip_reason():
        pytest.skip(ort_cuda_skip_reason())
    tiny_latte_export = latte_fixed2
    with open_runtime("ort", tiny_latte_export, providers=["cpu"]) as cpu:
        contract = cpu.contract
        if runtime == "torch":
            source = load_export_source(read_metadata(find_onnx(tiny_latte_export)), tiny_latte_export,
                                        device="cuda")
            gpu = TorchRuntime(None, device="cuda", source=source)
        else:
            gpu = open_runtime("ort", tiny_latte_export, providers=["cuda"])
        cond = {"encoder_hidden_states": np.random.default_rng(1).standard_normal((2, 16, 32)).astype(np.float32)}
        ddpm = make_steps(contract.schedule, "ddpm", prediction=contract.prediction, learned_variance=True)
        for plan in (make_steps(contract.schedule, "unipc", 8), ddpm[-6:]):
            ref = sample(cpu, contract, cond, plan, guidance=3.0, seed=2)
            got = sample(gpu, contract, cond, plan, guidance=3.0, seed=2)
            assert rel_l2(got, ref) < 1e-3, runtime
        gpu.close()
