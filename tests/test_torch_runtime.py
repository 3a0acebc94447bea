"""The PyTorch runtime's fused step (the GPU baseline's code path, run here on the CPU)."""
import numpy as np
import pytest

from vdit_deploy.samplers import guided_step, make_steps
from vdit_deploy.errors import VditError
from vdit_deploy.runtimes import open_runtime
from vdit_deploy.runtimes.torch_runtime import TorchDeviceArray


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_step_on_device_equals_the_host_update(tiny_checkpoint, guidance):
    with open_runtime("torch", tiny_checkpoint, device="cpu") as rt:
        contract = rt.contract
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, *contract.video_shape), dtype=np.float32)
        y = contract.labels([0, 3])
        null = contract.null_batch(rt.null, y) if guidance != 1.0 else None
        step = make_steps(rt.schedule, "ddim", 10, eta=1.0)[4]      # a stochastic step: noise matters
        noise = rng.standard_normal(x.shape, dtype=np.float32)
        out = rt.step(x, step.t, y, guidance, step.coefs, noise)
        assert isinstance(out, TorchDeviceArray) and out.shape == x.shape
        ref = guided_step(rt.denoise, x, step.t, y, null, guidance, step.coefs, noise)
        np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)
        # the device video feeds the next step without a host round trip
        again = rt.step(out, step.t, y, guidance, step.coefs, noise)
        np.testing.assert_allclose(np.asarray(again), guided_step(rt.denoise, ref, step.t, y, null, guidance,
                                                                  step.coefs, noise), atol=5e-5)


def test_unknown_compile_mode_is_one_line(tiny_checkpoint):
    with pytest.raises(VditError, match="torch.compile mode must be one of"):
        open_runtime("torch", tiny_checkpoint, device="cpu", compile="fastest")


@pytest.mark.parametrize("sampler", ["dpm++", "unipc"])
def test_multistep_state_stays_on_the_device_and_matches_the_host_solver(tiny_checkpoint, sampler):
    from vdit_deploy.samplers import SolverState
    from vdit_deploy.sampling import sample

    with open_runtime("torch", tiny_checkpoint, device="cpu") as rt:
        plan = make_steps(rt.schedule, sampler, 6)
        on_device = sample(rt, rt.contract, [0, 2], plan, guidance=2.0, seed=4)
        on_host = sample(rt.denoise, rt.contract, [0, 2], plan, guidance=2.0, seed=4, null=rt.null)
        np.testing.assert_allclose(on_device, on_host, atol=1e-4)
        state = SolverState()
        x = np.zeros((1, *rt.contract.video_shape), np.float32)
        rt.step(x, plan[0].t, rt.contract.labels([1]), 2.0, plan[0].coefs, x, state)
        assert isinstance(state.x0_prev, TorchDeviceArray) and isinstance(state.corr, TorchDeviceArray)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_fused_step_of_a_learned_sigma_model_equals_the_host_update(tiny_latte, guidance):
    """An eps+var model (diffusers Latte, text-conditioned) on DDPM's learned-variance coefficients: the
    torch FusedStep (2B batch with the null embeddings, guidance on eps, variance from the cond pass,
    std from it) equals host guided_step + numpy apply_step, and the variance channels change the step."""
    from vdit_deploy.samplers import COEF_NAMES

    with open_runtime("torch", tiny_latte, device="cpu") as rt:
        contract = rt.contract
        assert contract.output == "eps+var" and contract.out_channels == 2 * contract.latent[0]
        rng = np.random.default_rng(0)
        cond = contract.example_cond(2, rng)
        null = contract.null_batch(rt.null, cond) if guidance != 1.0 else None
        x = rng.standard_normal((2, *contract.video_shape), dtype=np.float32)
        noise = rng.standard_normal(x.shape, dtype=np.float32)
        plan = make_steps(contract.schedule, "ddpm", prediction=contract.prediction, learned_variance=True)
        fixed = make_steps(contract.schedule, "ddpm", prediction=contract.prediction)
        for i in (0, 500, -3, -2):
            coefs = plan[i].coefs
            assert coefs[COEF_NAMES.index("learned_var")] == 1 and coefs[COEF_NAMES.index("sigma")] == 0
            got = np.asarray(rt.step(x, plan[i].t, cond, guidance, coefs, noise))
            ref = guided_step(rt.denoise, x, plan[i].t, cond, null, guidance, coefs, noise)
            np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)
            if i < 0:   # near t = 0 the posterior's variance is well below beta_t: the learned one differs
                without = guided_step(rt.denoise, x, plan[i].t, cond, null, guidance, fixed[i].coefs, noise)
                assert np.abs(without - ref).max() > 1e-3


@pytest.mark.parametrize("args,message", [
    (["--device", "tpu"], "device must be cpu, cuda or cuda:N"),
    (["--runtime", "ort", "--onnx", ".", "--device", "cuda"], "--device, --compile and --null are for --runtime torch"),
    (["--runtime", "ort", "--onnx", ".", "--null", "n.safetensors"], "an export carries its null conditioning"),
    (["--compile", "fastest"], "Invalid value for '--compile'"),
])
def test_sample_device_and_compile_options_fail_in_one_line(tmp_path, args, message):
    from click.testing import CliRunner

    from vdit_deploy.cli import main

    out = tmp_path / "v.gif"
    result = CliRunner().invoke(main, ["sample", *args, "--out", str(out)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0]
    assert not out.exists()
