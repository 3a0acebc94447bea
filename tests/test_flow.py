"""Flow matching and CogVideoX's schedulers against diffusers: whole trajectories of each plan (host
float64 coefficients, the float32 affine step) against the diffusers scheduler it claims to be, driven
by the same deterministic model, to 1e-5 relative L2."""
import math

import numpy as np
import pytest

from vdit_deploy.errors import VditError
from vdit_deploy.flow import FlowSchedule, linear_quadratic
from vdit_deploy.flow_samplers import flow_steps
from vdit_deploy.samplers import SolverState, apply_step, make_steps
from vdit_deploy.scheduler_config import read_scheduler_config

diffusers = pytest.importorskip("diffusers", reason="pip install 'vdit-deploy[dev]' for the diffusers comparisons")
torch = pytest.importorskip("torch")

SHAPE = (2, 3, 2, 4, 4)
TOL = 1e-5


def model(x: np.ndarray, t) -> np.ndarray:
    """A smooth nonlinear stand-in for a denoiser, timestep-dependent (same numbers on both sides)."""
    t = np.float32(t)
    return (0.6 * x + 0.4 * np.sin(1.7 * x + t / 300.0) - 0.1 * np.cos(t / 170.0)).astype(np.float32)


def start(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def noises(n, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(n)]


def run_ours(plan, zs=None):
    x, state, ts = start(), SolverState(), []
    for i, step in enumerate(plan):
        ts.append(step.t)
        x = apply_step(x, model(x, step.t), step.coefs, None if zs is None else zs[i], state)
    return x, ts


def run_theirs(scheduler, step=None, zs=None, module=None, monkeypatch=None):
    """diffusers' loop (the pipelines'): the model fed each scheduler timestep, scheduler.step after it.
    zs: the noise each step draws (patched into the scheduler module's randn_tensor)."""
    current = {}
    if zs is not None:
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: current["z"])
    x, ts = torch.from_numpy(start()), []
    old = None
    for i, t in enumerate(scheduler.timesteps):
        ts.append(float(t))
        if zs is not None:
            current["z"] = torch.from_numpy(zs[i])
        out = torch.from_numpy(model(x.numpy(), float(t)))
        if step is None:
            x = scheduler.step(out, t, x).prev_sample
        else:
            x, old = step(scheduler, out, old, t, scheduler.timesteps[i - 1] if i > 0 else None, x)
    return x.numpy(), ts


def rel(a, b) -> float:
    return float(np.linalg.norm(np.float64(a) - b) / np.linalg.norm(np.float64(b)))


def calculate_shift(n, fs: FlowSchedule):
    m = (fs.max_shift - fs.base_shift) / (fs.max_seq_len - fs.base_seq_len)
    return n * m + fs.base_shift - m * fs.base_seq_len


FLOW_CLASSES = {"euler": ("FlowMatchEulerDiscreteScheduler", "shift", {}),
                "unipc": ("UniPCMultistepScheduler", "flow_shift", {"use_flow_sigmas": True,
                                                                   "prediction_type": "flow_prediction"}),
                "dpm++": ("DPMSolverMultistepScheduler", "flow_shift", {"use_flow_sigmas": True,
                                                                       "prediction_type": "flow_prediction"})}


def flow_pair(sampler, steps, seq_len=None, **keys):
    cls, shift_key, extra = FLOW_CLASSES[sampler]
    keys = {shift_key if k == "shift" else k: x for k, x in keys.items()}
    config = {"_class_name": cls, **extra, **keys}
    schedule, prediction, _ = read_scheduler_config(config, seq_len=seq_len)
    assert prediction == "flow" and schedule.sampler == sampler
    theirs = getattr(diffusers, cls).from_config(config)
    kw = {"mu": calculate_shift(seq_len, schedule)} if seq_len else {}
    theirs.set_timesteps(steps, **kw)
    return make_steps(schedule, sampler, steps, prediction="flow"), theirs


@pytest.mark.parametrize("steps", [4, 10, 30])
@pytest.mark.parametrize("shift,seq_len", [(1.0, None), (3.0, None), (5.0, None), (7.0, None),
                                           (1.0, 256), (3.0, 1500), (1.0, 4096)])
@pytest.mark.parametrize("sampler", ["euler", "unipc", "dpm++"])
def test_flow_trajectories_match_diffusers(sampler, shift, seq_len, steps):
    """Static shifts 1-7, and dynamic shifting (use_dynamic_shifting: mu from the token count, the
    static shift then unused) at 256 / 1500 / 4096 tokens; the model is fed diffusers' timesteps."""
    keys = {"shift": shift} if seq_len is None else {"shift": shift, "use_dynamic_shifting": True}
    plan, theirs = flow_pair(sampler, steps, seq_len, **keys)
    ours, t_ours = run_ours(plan)
    ref, t_ref = run_theirs(theirs)
    assert t_ours == pytest.approx(t_ref, rel=1e-6, abs=1e-4)
    assert rel(ours, ref) < TOL


@pytest.mark.parametrize("keys", [
    {"shift": 3.0, "shift_terminal": 0.1},
    {"use_dynamic_shifting": True, "shift_terminal": 0.1, "time_shift_type": "linear"},     # LTX-Video's
    {"shift": 3.0, "use_karras_sigmas": True},
    {"shift": 3.0, "use_exponential_sigmas": True},
    {"shift": 3.0, "use_beta_sigmas": True},
])
def test_flow_euler_sigma_options_match_diffusers(keys):
    plan, theirs = flow_pair("euler", 12, 2048 if keys.get("use_dynamic_shifting") else None, **keys)
    assert rel(run_ours(plan)[0], run_theirs(theirs)[0]) < TOL


@pytest.mark.parametrize("keys", [{"shift": 5.0, "shift_terminal": 0.05}, {"shift": 3.0, "solver_order": 1}])
def test_flow_unipc_options_match_diffusers(keys):
    plan, theirs = flow_pair("unipc", 12, **keys)
    assert rel(run_ours(plan)[0], run_theirs(theirs)[0]) < TOL


@pytest.mark.parametrize("base", ["linear", "linear_zero", "linear_quadratic"])
def test_pipeline_base_sigmas_match_diffusers(base):
    """LTX's, Hunyuan's and Mochi's own sigmas handed to set_timesteps(sigmas=...); Mochi's inverted."""
    n = 16
    fs = FlowSchedule(shift=1.0 if base == "linear_quadratic" else 5.0, invert=base == "linear_quadratic",
                      base_sigmas=base)
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(shift=fs.shift, invert_sigmas=fs.invert)
    sigmas = {"linear": np.linspace(1.0, 1 / n, n), "linear_zero": np.linspace(1.0, 0.0, n + 1)[:-1],
              "linear_quadratic": np.array(linear_quadratic(n, 0.025))}[base]
    theirs.set_timesteps(sigmas=sigmas)
    plan = flow_steps(fs, "euler", n)
    ours, t_ours = run_ours(plan)
    ref, t_ref = run_theirs(theirs)
    assert t_ours == pytest.approx(t_ref, rel=1e-6, abs=1e-4) and rel(ours, ref) < TOL


def test_mochi_config_is_inverted_with_its_pipeline_defaults():
    schedule, prediction, _ = read_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                     "invert_sigmas": True})
    assert (prediction, schedule.invert, schedule.base_sigmas, schedule.steps) == ("flow", True, "linear_quadratic", 64)
    plan = flow_steps(schedule)
    assert len(plan) == 64 and plan[0].t == pytest.approx(0.0) and plan[-1].t > 900   # fed (1 - sigma) T


def test_stochastic_flow_euler_matches_diffusers(monkeypatch):
    import diffusers.schedulers.scheduling_flow_match_euler_discrete as module

    plan, theirs = flow_pair("euler", 10, shift=3.0, stochastic_sampling=True)
    assert all(s.stochastic for s in plan[:-1]) and not plan[-1].stochastic    # the last re-noises by sigma 0
    zs = noises(10)
    ref, _ = run_theirs(theirs, zs=zs, module=module, monkeypatch=monkeypatch)
    assert rel(run_ours(plan, zs)[0], ref) < TOL


# ---- CogVideoX's and zero-terminal-SNR schedules ------------------------------------------------------
COGVIDEOX = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "clip_sample_range": 1.0, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
             "rescale_betas_zero_snr": True, "sample_max_value": 1.0, "set_alpha_to_one": True,
             "snr_shift_scale": 3.0, "steps_offset": 0, "timestep_spacing": "trailing", "trained_betas": None}


def _cogvideox_step(scheduler, out, old, t, t_back, x):
    return scheduler.step(out, old, t, t_back, x, return_dict=False)


@pytest.mark.parametrize("steps", [4, 10, 30, 50])
@pytest.mark.parametrize("cls", ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"])
def test_cogvideox_schedulers_match_diffusers(cls, steps, monkeypatch):
    """CogVideoX-2b's (DDIM) and -5b's (DPM) configs: v-prediction, zero terminal SNR, snr_shift_scale 3,
    trailing timesteps; the DPM one is stochastic (its noise patched in)."""
    import diffusers.schedulers.scheduling_dpm_cogvideox as module

    config = {"_class_name": cls, **COGVIDEOX}
    schedule, prediction, _ = read_scheduler_config(config)
    assert prediction == "v" and schedule.zero_snr and schedule.snr_shift == 3.0 and schedule.clip is None
    assert (schedule.sampler, schedule.spacing, schedule.steps) == (
        "ddim" if "DDIM" in cls else "cogvideox-dpm", "trailing", 50)
    theirs = getattr(diffusers, cls).from_config(config)
    theirs.set_timesteps(steps)
    np.testing.assert_allclose(schedule.alphas_cumprod, theirs.alphas_cumprod.double().numpy(), rtol=1e-6, atol=1e-12)
    plan = make_steps(schedule, schedule.sampler, steps, clip=schedule.clip, spacing=schedule.spacing, prediction="v")
    zs = noises(steps) if "DPM" in cls else None
    ref, t_ref = run_theirs(theirs, _cogvideox_step if zs else None, zs=zs, module=module, monkeypatch=monkeypatch)
    ours, t_ours = run_ours(plan, zs)
    assert t_ours == t_ref and rel(ours, ref) < TOL


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_spacing_matches_diffusers_ddim(spacing):
    config = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
              "beta_end": 0.012, "clip_sample": False, "prediction_type": "v_prediction",
              "rescale_betas_zero_snr": True, "timestep_spacing": spacing}
    schedule, prediction, _ = read_scheduler_config(config)
    theirs = diffusers.DDIMScheduler.from_config(config)
    theirs.set_timesteps(30)
    plan = make_steps(schedule, "ddim", 30, clip=schedule.clip, spacing=schedule.spacing, prediction=prediction)
    assert rel(run_ours(plan)[0], run_theirs(theirs)[0]) < TOL


@pytest.mark.parametrize("cls", ["UniPCMultistepScheduler", "DPMSolverMultistepScheduler"])
def test_zero_snr_solvers_match_diffusers(cls):
    """rescale_betas_zero_snr on the multistep solvers: alpha_bar_T = 2^-24 as diffusers keeps it."""
    config = {"_class_name": cls, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
              "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    schedule, prediction, _ = read_scheduler_config(config)
    sampler = schedule.sampler
    theirs = getattr(diffusers, cls).from_config(config)
    theirs.set_timesteps(20)
    plan = make_steps(schedule, sampler, 20, clip=schedule.clip, spacing=schedule.spacing, prediction=prediction,
                      lambda_min=schedule.lambda_min)
    assert rel(run_ours(plan)[0], run_theirs(theirs)[0]) < TOL


# ---- the flow schedule itself ------------------------------------------------------------------------
def test_flow_schedule_round_trips_and_is_checked():
    fs = FlowSchedule(shift=5.0, dynamic_shift=True, seq_len=1024, shift_terminal=0.1, sampler="unipc", steps=30)
    from vdit_deploy.schedules import Schedule

    assert Schedule.from_dict(fs.to_dict()) == fs and fs.to_dict()["kind"] == "flow"
    for bad, message in [({"shift": 0.0}, "shift must be > 0"), ({"dynamic_shift": True}, "needs the token count"),
                         ({"sampler": "ddim"}, "sampler must be one of euler, unipc, dpm"),
                         ({"shift_terminal": 1.0}, "shift_terminal must be below 1")]:
        with pytest.raises(VditError, match=message):
            FlowSchedule(**bad)
    with pytest.raises(VditError, match="export metadata: invalid flow schedule") as e:
        Schedule.from_dict({"kind": "flow", "shift": "3"}, "export metadata")
    assert "\n" not in str(e.value)


def test_flow_plans_refuse_what_they_do_not_run():
    fs = FlowSchedule(shift=3.0)
    for kwargs, message in [(dict(sampler="ddim"), "samples with euler, unipc, dpm"),
                            (dict(sampler="unipc", order=3), "order 3 is not run"),
                            (dict(sampler="euler", order=2), "euler has no order option"),
                            (dict(sampler="euler", eta=1.0), "take no eta"),
                            (dict(sampler="unipc", spacing="trailing"), "take no a timestep spacing"),
                            (dict(sampler="euler", prediction="eps"), "needs a velocity")]:
        with pytest.raises(VditError, match=message):
            make_steps(fs, **{"prediction": "flow", **kwargs})
    with pytest.raises(VditError, match="euler is for flow-matching models"):
        make_steps(__import__("vdit_deploy.schedules").schedules.Schedule(), "euler")


def test_flow_x0_form_is_the_velocity_update():
    """flow euler's x0 form equals diffusers' x + (sigma_next - sigma) v, and x0 = x - sigma v."""
    fs = FlowSchedule(shift=3.0)
    x, vel = start(), start(5)
    for step in flow_steps(fs, "euler", 6):
        s = step.coefs[1]
        nxt = s * step.coefs[4]       # c_xt = sigma_next / sigma
        np.testing.assert_allclose(apply_step(x, vel, step.coefs, None), x + (nxt - s) * vel, rtol=2e-5, atol=2e-6)
        assert math.isinf(step.coefs[2])           # no clipping
