"""A tiny flow-matching diffusers model (a random LatteTransformer3DModel with a
FlowMatchEulerDiscreteScheduler config beside it, as save_pretrained writes them) through export ->
verify -> sample on ONNX Runtime and torch, against diffusers' own scheduler loops."""
import json

import numpy as np
import pytest

from conftest import open_built, save_tiny_latte, trt_skip_reason

diffusers = pytest.importorskip("diffusers", reason="pip install 'vdit-deploy[dev]' for the diffusers model tests")
torch = pytest.importorskip("torch")

D, SEQ, SHIFT = 32, 16, 3.0
LATENT = (4, 2, 8, 8)


def save_tiny_flow_latte(path):
    save_tiny_latte(path, out_channels=4, variance_type="fixed_small", seed=5)
    diffusers.FlowMatchEulerDiscreteScheduler(shift=SHIFT).save_pretrained(path)   # replaces the DDPM config
    return path


@pytest.fixture(scope="module")
def flow_export(tmp_path_factory):
    from vdit_deploy.export.onnx_export import export_checkpoint

    model_dir = save_tiny_flow_latte(tmp_path_factory.mktemp("flow") / "latte")
    return model_dir, export_checkpoint(model_dir, tmp_path_factory.mktemp("flow_onnx") / "export", batch=(1, 2),
                                        seq=(1, SEQ))


def prompts(b, seed=1):
    return {"encoder_hidden_states": np.random.default_rng(seed).standard_normal((b, SEQ, D)).astype(np.float32)}


def rel(a, b):
    return float(np.linalg.norm(np.float64(a) - b) / np.linalg.norm(np.float64(b)))


def diffusers_scheduler(sampler):
    cls, extra = {"euler": ("FlowMatchEulerDiscreteScheduler", {"shift": SHIFT}),
                  "unipc": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": SHIFT,
                                                        "prediction_type": "flow_prediction"}),
                  "dpm++": ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": SHIFT,
                                                            "prediction_type": "flow_prediction"})}[sampler]
    return getattr(diffusers, cls)(**extra)


def diffusers_loop(scheduler, steps, denoise, cond, null, guidance, seed, batch):
    """diffusers' pipeline loop: x_T from the same seeded draw as vdit's sampler, the model on [x, x]
    with the prompt and the null prompt, CFG, scheduler.step."""
    scheduler.set_timesteps(steps)
    x = np.random.default_rng(seed).standard_normal((batch, *LATENT), dtype=np.float32)
    for t in scheduler.timesteps:
        both = denoise(np.concatenate([x, x]), np.full(2 * batch, float(t), np.float32),
                       {k: np.concatenate([cond[k], null[k]]) for k in cond})
        out = both[batch:] + np.float32(guidance) * (both[:batch] - both[batch:])
        x = scheduler.step(torch.from_numpy(out), t, torch.from_numpy(x)).prev_sample.numpy()
    return x


def test_flow_model_exports_verifies_and_samples_as_diffusers(flow_export):
    """export -> verify -> sample on ORT and torch; ORT's fused-step samples equal diffusers'
    FlowMatchEulerDiscreteScheduler driving the PyTorch model (1e-4)."""
    from vdit_deploy.export.verify import verify
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.runtimes.torch_runtime import TorchRuntime
    from vdit_deploy.sampling import describe_sampling, sample, sampler_plan
    from vdit_deploy.sources import load_source

    model_dir, export = flow_export
    assert json.loads((model_dir / "scheduler_config.json").read_text())["_class_name"] == \
        "FlowMatchEulerDiscreteScheduler"
    report = verify(export, model_dir, batches=(1,), num_steps=6, picks=2, polygraphy=False)
    assert report.ok, report.table()
    steps, seed, cond = 8, 4, prompts(1)
    source = load_source(model_dir)
    with open_runtime("ort", export) as ort_rt, TorchRuntime(None, source=source, device="cpu") as torch_rt:
        contract = ort_rt.contract
        assert contract.output == "flow" and contract.schedule.kind == "flow" and contract.schedule.shift == SHIFT
        assert "flow matching" in describe_sampling(contract) and "euler" in describe_sampling(contract)
        plan = sampler_plan(contract, None, steps)            # the config's sampler: flow euler
        ours = sample(ort_rt, contract, cond, plan, 1.0, seed)
        on_torch = sample(torch_rt, contract, cond, plan, 1.0, seed)

        def pytorch(x, t, c):
            with torch.no_grad():
                return source.module(torch.from_numpy(x), torch.from_numpy(t),
                                     torch.from_numpy(c["encoder_hidden_states"])).numpy()

        null = {k: np.zeros_like(a) for k, a in cond.items()}
        theirs = diffusers_loop(diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir), steps, pytorch,
                                cond, null, 1.0, seed, 1)
    assert rel(ours, theirs) < 1e-4 and rel(on_torch, theirs) < 1e-4


@pytest.mark.parametrize("runtime", ["ort", "torch"])
@pytest.mark.parametrize("sampler", ["euler", "unipc", "dpm++"])
def test_fused_step_graph_runs_flow_samplers_as_diffusers(flow_export, runtime, sampler):
    """The runtime's fused step (guidance 2: the 2B batch, CFG and the affine update in one graph on
    ORT) over a whole trajectory equals diffusers' scheduler loop driving the same runtime's denoiser
    (1e-5: the step math alone)."""
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.runtimes.torch_runtime import TorchRuntime
    from vdit_deploy.sampling import sample, sampler_plan

    model_dir, export = flow_export
    steps, seed, guidance, cond = 10, 2, 2.0, prompts(2)
    from vdit_deploy.sources import load_source

    rt = open_runtime("ort", export) if runtime == "ort" else \
        TorchRuntime(None, source=load_source(model_dir, seq=(1, SEQ)), device="cpu")
    with rt:
        ours = sample(rt, rt.contract, cond, sampler_plan(rt.contract, sampler, steps), guidance, seed)
        null = rt.contract.null_batch(rt.null, cond)
        theirs = diffusers_loop(diffusers_scheduler(sampler), steps, rt.denoise, cond, null, guidance, seed, 2)
    assert rel(ours, theirs) < 1e-5


TRT_REASON = trt_skip_reason()


@pytest.mark.gpu
@pytest.mark.skipif(TRT_REASON is not None, reason=TRT_REASON or "")
@pytest.mark.parametrize("sampler", ["euler", "unipc"])
def test_tensorrt_runs_the_flow_samplers_as_ort(flow_export, sampler):
    """TensorRT's fused step (state ping-ponged on the device) on the flow model equals ORT on the CPU."""
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import sample, sampler_plan

    _, export = flow_export
    cond = prompts(2)
    with open_runtime("ort", export) as ref:
        plan = sampler_plan(ref.contract, sampler, 10)
        want = sample(ref, ref.contract, cond, plan, 2.0, 3)
    with open_built(export, "fp32") as rt:
        got = sample(rt, rt.contract, cond, plan, 2.0, 3)
    assert rel(got, want) < 1e-3
