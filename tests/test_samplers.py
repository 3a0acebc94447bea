"""DDIM, DDPM (with learned variance), DPM-Solver++(2M) and UniPC-bh2: whole trajectories of eps, v and
x0 models against diffusers (a peer implementation), the fused ONNX step against the host update, and the
one-line refusals."""
import math
import re

import numpy as np
import pytest

from vdit_deploy.schedules import LAMBDA_MIN, Schedule, solver_timesteps

from vdit_deploy.samplers import SolverState, apply_step, make_steps
from vdit_deploy.errors import VditError

SHAPE = (2, 3, 2, 4, 4)       # (B, C, F, H, W): small, the math is per element


def model_fn(x: np.ndarray, t: int, schedule: Schedule, prediction: str = "eps", channels: int = 3) -> np.ndarray:
    """A fixed, deterministic stand-in for a denoiser: a bounded data prediction, smooth and nonlinear
    in x and t, handed out as the eps, v or x0 that implies it (so x0 stays in range at every noise level
    and the solvers' orders make a difference). channels=6: a learned-sigma model (eps/v/x0, then the
    variance in [-1, 1], which DDPM with learned variance uses and every other sampler must ignore)."""
    ab = float(schedule.alpha_bar(t))
    alpha, sigma = math.sqrt(ab), math.sqrt(1 - ab)
    x0 = np.tanh(1.5 * x) * (0.8 + 0.1 * math.cos(t / 300)) + 0.05 * np.sin(3 * x)
    eps = (x - alpha * x0) / sigma
    out = {"eps": eps, "v": alpha * eps - sigma * x0, "x0": x0}[prediction]
    if channels == 2 * x.shape[1]:
        out = np.concatenate([out, np.cos(2 * x + t / 100)], axis=1)
    return out.astype(np.float32)


def diffusers_trajectory(scheduler, steps: int, x: np.ndarray, schedule, prediction, channels: int, seed=None,
                         **step_options):
    """diffusers' trajectory; with a seed, the noise comes from torch.Generator(seed), as in our_trajectory."""
    import torch

    scheduler.set_timesteps(steps)
    if type(scheduler).__name__ == "DDIMScheduler":
        # diffusers' DDIM steps from t to t - T // num_inference_steps, not to the next listed timestep as
        # ours (and guided-diffusion's) does; where linspace's timesteps are evenly spaced (steps - 1
        # divides T - 1), setting that stride makes it step between the listed ones
        stride, rest = divmod(schedule.num_timesteps - 1, steps - 1)
        scheduler.num_inference_steps = schedule.num_timesteps // stride
        assert rest == 0 and schedule.num_timesteps // scheduler.num_inference_steps == stride
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    xs, sample = [], torch.from_numpy(x)
    for t in scheduler.timesteps:
        out = torch.from_numpy(model_fn(sample.numpy(), int(t), schedule, prediction, channels))
        # DDPM reads learned variance, DPM-Solver drops it for eps and v models; for the others (and
        # DPM-Solver's x0 models) diffusers' pipelines cut the variance channels themselves
        uses_variance = type(scheduler).__name__ == "DDPMScheduler" or (
            type(scheduler).__name__.startswith("DPMSolver") and prediction != "x0")
        if channels != x.shape[1] and not uses_variance:
            out = out[:, :x.shape[1]]
        if generator is not None and type(scheduler).__name__ == "DDIMScheduler":
            step_options["variance_noise"] = torch.randn(sample.shape, generator=generator)
        elif generator is not None:
            step_options["generator"] = generator
        sample = scheduler.step(out, t, sample, **step_options).prev_sample
        xs.append(sample.numpy().copy())
    return [int(t) for t in scheduler.timesteps], xs


def our_trajectory(plan, x: np.ndarray, schedule, prediction, channels: int, seed=None):
    """Our trajectory; with a seed, each stochastic step's noise is the next draw of torch.Generator(seed)."""
    import torch

    generator = None if seed is None else torch.Generator().manual_seed(seed)
    state, xs = SolverState(), []
    for step in plan:
        noise = torch.randn(x.shape, generator=generator).numpy() if step.stochastic else None
        x = apply_step(x, model_fn(x, step.t, schedule, prediction, channels), step.coefs, noise, state)
        xs.append(x)
    return [s.t for s in plan], xs


def assert_same_trajectory(ours, theirs, tolerance: float):
    assert ours[0] == theirs[0]                             # the timesteps
    for i, (a, b) in enumerate(zip(ours[1], theirs[1])):
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert rel < tolerance, (i, rel)
    assert np.abs(ours[1][-1] - ours[1][0]).max() > 0.1      # the trajectory went somewhere


DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def with_our_alpha_bar(scheduler, schedule: Schedule):
    """DDIM and DDPM schedulers read alphas_cumprod at each step; diffusers' is a float32 cumprod, which
    leaves 1 - alpha_bar near t = 0 (1e-4) to ~6e-4 relative (5e-6 of the last sample). Ours is float64:
    hand diffusers the same table, so the comparison sees the update rules, not that rounding."""
    import torch

    scheduler.alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod)
    return scheduler


def make_diffusers(sampler: str, schedule: Schedule, prediction: str, spacing: str, order: int, learned: bool,
                   lambda_min: float = -math.inf):
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    common = dict(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas,
                  prediction_type=DIFFUSERS_PREDICTION[prediction], timestep_spacing=spacing,
                  solver_order=order, lower_order_final=True, final_sigmas_type="zero")
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint", lambda_min_clipped=lambda_min,
                                           variance_type="learned_range" if learned else None, **common)
    return UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, **common)


# (sampler, schedule, steps, prediction, spacing, order, learned sigma, relative tolerance)
SOLVERS = ("dpm++", "unipc")
CASES = [(m, "linear", n, "eps", "linspace", 2, False, 1e-5) for m in SOLVERS for n in (5, 10, 20)]
CASES += [(m, "cosine", n, p, s, 2, False, 1e-5) for m in SOLVERS for n in (5, 10, 20)
          for p, s in (("eps", "leading"), ("v", "linspace"))]
CASES += [(m, "linear", 10, "v", "trailing", 2, False, 1e-5) for m in SOLVERS]
CASES += [(m, "cosine", 20, "eps", "leading", 2, True, 1e-5) for m in SOLVERS]
CASES += [(m, "linear", 5, "eps", "trailing", 1, False, 1e-5) for m in SOLVERS]
CASES += [(m, "cosine", 10, "x0", "linspace", 2, True, 1e-5) for m in SOLVERS]     # they only use x0
# diffusers' defaults start at t=999 (lambda_min -inf); ours start at LAMBDA_MIN (DPM-Solver++ has that
# option in diffusers, UniPC has not): checked below with the DPM-Solver++ scheduler.
# Cosine's t=999 has alpha_bar 2.4e-9: an eps model's x0 = (x_t - sigma eps) / alpha is a 5e-5 part of
# x_t scaled up 2e4 times, so float32 (diffusers' as ours) leaves x0 only to ~1e-3 there; from the
# next step on both solvers agree again. That floor, checked, not hidden:
CASES += [(m, "cosine", n, "eps", "linspace", 2, False, 1e-3) for m in SOLVERS for n in (5, 20)]


@pytest.mark.parametrize("sampler,kind,steps,prediction,spacing,order,learned,tolerance", CASES)
def test_trajectory_matches_diffusers(sampler, kind, steps, prediction, spacing, order, learned, tolerance):
    schedule = Schedule(kind, 1000)
    x_T = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    channels = 2 * SHAPE[1] if learned else SHAPE[1]
    theirs_t, theirs = diffusers_trajectory(make_diffusers(sampler, schedule, prediction, spacing, order, learned),
                                            steps, x_T, schedule, prediction, channels)
    plan = make_steps(schedule, sampler, steps, clip=math.inf, order=order, spacing=spacing, prediction=prediction,
                      lambda_min=-math.inf)
    assert_same_trajectory(our_trajectory(plan, x_T, schedule, prediction, channels), (theirs_t, theirs), tolerance)


# (schedule, steps, prediction, eta, clip, learned-sigma model): DDIM against diffusers' DDIMScheduler
DDIM_CASES = [("linear", 10, "v", 0.0, math.inf, False), ("cosine", 28, "v", 0.0, 1.0, True),
              ("linear", 10, "v", 1.0, 1.0, False), ("cosine", 4, "v", 0.5, math.inf, False),
              ("linear", 10, "x0", 0.0, math.inf, False), ("cosine", 28, "x0", 1.0, 1.0, True),
              ("linear", 10, "eps", 0.0, 1.0, False)]


@pytest.mark.parametrize("kind,steps,prediction,eta,clip,learned", DDIM_CASES)
def test_ddim_matches_diffusers(kind, steps, prediction, eta, clip, learned):
    """v and x0 models: DDIM folds the eps term into x0 and x_t (eps_hat is not eps there); with clipping,
    diffusers re-derives eps from the clipped x0 too (use_clipped_model_output)."""
    from diffusers import DDIMScheduler

    schedule = Schedule(kind, 1000)
    x_T = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    channels = 2 * SHAPE[1] if learned else SHAPE[1]
    scheduler = with_our_alpha_bar(DDIMScheduler(
        num_train_timesteps=1000, trained_betas=schedule.betas, timestep_spacing="linspace",
        prediction_type=DIFFUSERS_PREDICTION[prediction], clip_sample=clip < math.inf, clip_sample_range=min(clip, 1.0)),
        schedule)
    theirs = diffusers_trajectory(scheduler, steps, x_T, schedule, prediction, channels, seed=7 if eta else None,
                                  eta=eta, use_clipped_model_output=True)
    plan = make_steps(schedule, "ddim", steps, eta=eta, clip=clip, prediction=prediction)
    assert any(s.stochastic for s in plan) == (eta > 0)
    assert_same_trajectory(our_trajectory(plan, x_T, schedule, prediction, channels, seed=7), theirs, 1e-6)


@pytest.mark.parametrize("kind,prediction,clip", [("linear", "eps", 1.0), ("cosine", "v", math.inf),
                                                  ("linear", "x0", 1.0)])
def test_learned_variance_ddpm_matches_diffusers(kind, prediction, clip):
    """A learned-sigma model's ancestral steps against DDPMScheduler(variance_type="learned_range") on
    the same noise: the log variance between the clamped posterior's and beta_t's, none at t = 0."""
    from diffusers import DDPMScheduler

    schedule = Schedule(kind, 1000)
    x_T = np.random.default_rng(6).standard_normal(SHAPE).astype(np.float32)
    scheduler = with_our_alpha_bar(DDPMScheduler(
        num_train_timesteps=1000, trained_betas=schedule.betas, variance_type="learned_range",
        prediction_type=DIFFUSERS_PREDICTION[prediction], clip_sample=clip < math.inf), schedule)
    theirs = diffusers_trajectory(scheduler, 1000, x_T, schedule, prediction, 2 * SHAPE[1], seed=8)
    plan = make_steps(schedule, "ddpm", clip=clip, prediction=prediction, learned_variance=True)
    assert [s.stochastic for s in plan] == [True] * 999 + [False]
    ours = our_trajectory(plan, x_T, schedule, prediction, 2 * SHAPE[1], seed=8)
    assert_same_trajectory(ours, theirs, 1e-5)
    # the comparison sees the variance: the fixed posterior variance on the same noise is 100x further off
    # (not more: beta_t and the posterior variance differ much only at the last few t)
    fixed = our_trajectory(make_steps(schedule, "ddpm", clip=clip, prediction=prediction), x_T, schedule,
                           prediction, 2 * SHAPE[1], seed=8)
    assert max(np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(fixed[1], theirs[1])) > 1e-3


def test_learned_variance_ends_are_the_fixed_variances():
    """frac = 0 (out_var = -1) is the posterior variance (plain DDPM); frac = 1 is beta_t."""
    schedule = Schedule("cosine", 1000)
    learned, fixed = (make_steps(schedule, "ddpm", learned_variance=lv) for lv in (True, False))
    rng = np.random.default_rng(9)
    x, eps, z = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
    for i in (0, 500, 998):
        t = int(learned[i].t)
        low, high = (np.concatenate([eps, np.full_like(eps, v)], axis=1) for v in (-1.0, 1.0))
        np.testing.assert_allclose(apply_step(x, low, learned[i].coefs, z), apply_step(x, eps, fixed[i].coefs, z),
                                   rtol=1e-5, atol=1e-5)
        mean = apply_step(x, eps, fixed[i].coefs, np.zeros_like(z))
        np.testing.assert_allclose(apply_step(x, high, learned[i].coefs, z) - mean, math.sqrt(schedule.betas[t]) * z,
                                   rtol=1e-4, atol=1e-5)
    # t = 0 draws no noise, and a step whose graph predates learned variance (13 coefs) ignores it
    assert not learned[-1].stochastic and learned[-1].coefs[-3:].tolist() == [0, 0, 0]
    with_var = np.concatenate([eps, np.zeros_like(eps)], axis=1)
    np.testing.assert_array_equal(apply_step(x, with_var, learned[-1].coefs, None), apply_step(x, eps, fixed[-1].coefs, None))


def test_learned_variance_refusals():
    schedule = Schedule()
    step = make_steps(schedule, "ddpm", learned_variance=True)[0]
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(VditError, match="model output has 3 channels, not 2 x 3") as e:
        apply_step(x, x, step.coefs, x)
    assert "\n" not in str(e.value)
    with pytest.raises(VditError, match="this step adds noise: pass it"):
        apply_step(x, np.concatenate([x, x], axis=1), step.coefs, None)
    for sampler in ("ddim", "dpm++", "unipc"):
        with pytest.raises(VditError, match=f"learned variance is for ddpm's ancestral steps; {re.escape(sampler)} "
                                            "ignores a model's variance channels") as e:
            make_steps(schedule, sampler, 5, learned_variance=True)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind,spacing", [("cosine", "linspace"), ("cosine", "trailing"), ("linear", "leading")])
def test_lambda_min_matches_diffusers(kind, spacing):
    """Our default start (LAMBDA_MIN) is diffusers' lambda_min_clipped: same timesteps, same trajectory."""
    schedule = Schedule(kind, 1000)
    x_T = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    scheduler = make_diffusers("dpm++", schedule, "v", spacing, 2, False, lambda_min=LAMBDA_MIN)
    theirs_t, theirs = diffusers_trajectory(scheduler, 10, x_T, schedule, "v", 3)
    ours_t, ours = our_trajectory(make_steps(schedule, "dpm++", 10, clip=math.inf, spacing=spacing, prediction="v"),
                                  x_T, schedule, "v", 3)
    assert ours_t == theirs_t and ours_t[0] < 999
    assert max(np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(ours, theirs)) < 1e-5


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "unipc"])
@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_v_and_x0_models_sample_what_the_eps_model_does(sampler, prediction):
    """The same denoiser handed out as v or x0 instead of eps (model_fn's outputs imply the same x0) gives
    the same trajectory, with x0 clipping on: DDIM's eps term is rewritten in x0 and x_t for v/x0 models.
    (Linear: DDIM starts at t=999, where cosine's eps -> x0 is float32-limited to ~1e-3, see CASES.)"""
    schedule = Schedule("linear", 1000)
    x_T = np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32)
    runs = [our_trajectory(make_steps(schedule, sampler, 10, prediction=p), x_T, schedule, p, 3)[1]
            for p in ("eps", prediction)]
    for a, b in zip(*runs):
        assert np.linalg.norm(a - b) < 1e-4 * np.linalg.norm(b)


def test_first_order_dpm_solver_is_ddim():
    """DPM-Solver++ of order 1 is DDIM (Lu et al.): the same update on the same timesteps."""
    schedule = Schedule("cosine", 1000)
    dpm = make_steps(schedule, "dpm++", 8, order=1, lambda_min=-math.inf)
    rng = np.random.default_rng(2)
    x, out = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    for i, step in enumerate(dpm):
        ab, ab_next = schedule.alpha_bar(step.t), schedule.alpha_bar(dpm[i + 1].t if i + 1 < len(dpm) else -1)
        x0 = np.clip((x - math.sqrt(1 - ab) * out) / math.sqrt(ab), -1, 1)
        ddim = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next) * (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        np.testing.assert_allclose(apply_step(x, out, step.coefs, None, SolverState()), ddim, rtol=1e-4, atol=1e-4)


def test_spacings():
    linear = Schedule("linear")
    assert solver_timesteps(linear, 5, "linspace").tolist() == [999, 799, 599, 400, 200]
    assert solver_timesteps(linear, 5, "leading").tolist() == [830, 664, 498, 332, 166]
    assert solver_timesteps(linear, 5, "trailing").tolist() == [999, 799, 599, 399, 199]
    assert make_steps(linear, "dpm++", 1, lambda_min=-math.inf)[0].t == 999
    # the default start: the first t whose log(alpha/sigma) reaches LAMBDA_MIN
    for schedule in (linear, Schedule("cosine")):
        t0 = make_steps(schedule, "unipc", 10)[0].t
        lam = lambda t: 0.5 * math.log(schedule.alpha_bar(t) / (1 - schedule.alpha_bar(t)))
        assert lam(t0) >= LAMBDA_MIN > lam(t0 + 1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(sampler="euler"), "sampler must be one of ddpm, ddim, dpm.., unipc, cogvideox-dpm, got 'euler' "
                            r"\(euler is for flow-matching models\)"),
    (dict(sampler="dpm++", order=3), r"dpm\+\+ order 3 is not run: it needs the two previous x0"),
    (dict(sampler="dpm++", order=4), r"dpm\+\+ has orders 1 and 2, got 4"),
    (dict(sampler="unipc", order=0), "unipc has orders 1 and 2, got 0"),
    (dict(sampler="ddim", order=2), "ddim has no order option"),
    (dict(sampler="dpm++", steps=0), "steps must be between 1 and 1000, got 0"),
    (dict(sampler="unipc", steps=1001), "steps must be between 1 and 1000, got 1001"),
    (dict(sampler="unipc", steps=1000, spacing="leading"), "repeat timesteps"),
    (dict(sampler="dpm++", spacing="karras"), "timestep spacing must be one of linspace, leading, trailing"),
    (dict(sampler="dpm++", prediction="x1"), "prediction must be one of eps, v, x0 on a DDPM schedule, got 'x1'"),
    (dict(sampler="dpm++", eta=0.5), "deterministic ODE solver"),
])
def test_bad_input_is_one_line(kwargs, message):
    with pytest.raises(VditError, match=message) as e:
        make_steps(Schedule(), **kwargs)
    assert "\n" not in str(e.value)


def test_multistep_plan_needs_a_state():
    plan = make_steps(Schedule(), "unipc", 5)
    x = np.zeros(SHAPE, np.float32)
    apply_step(x, x, plan[0].coefs, None)            # the first step reads no state (it may go unkept)
    with pytest.raises(VditError, match="SolverState"):
        apply_step(x, x, plan[1].coefs, None)
    assert all(s.multistep for s in plan) and not any(s.multistep for s in make_steps(Schedule(), "ddim", 5))


# ---- the fused step graph -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ort_rt(tiny_export):
    from vdit_deploy.runtimes import open_runtime

    with open_runtime("ort", tiny_export) as rt:
        yield rt


@pytest.mark.parametrize("sampler", ["dpm++", "unipc"])
def test_ort_fused_step_equals_host_update(ort_rt, sampler):
    """step.onnx (guidance, update and solver state in the graph) against the numpy update on the same
    ORT denoiser, step by step along a real trajectory, the state included."""
    from vdit_deploy.samplers import guided_step

    contract = ort_rt.contract
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, *contract.video_shape), dtype=np.float32)
    y, zeros = contract.labels([1, 3]), np.zeros_like(x)
    null = contract.null_batch(ort_rt.null, y)
    fused, host, corr_seen = SolverState(), SolverState(), 0.0
    for step in make_steps(ort_rt.schedule, sampler, 6):
        got = np.asarray(ort_rt.step(x, step.t, y, 2.0, step.coefs, zeros, fused))
        ref = guided_step(ort_rt.denoise, x, step.t, y, null, 2.0, step.coefs, zeros, host)
        for a, b in ((got, ref), (fused.x0_prev, host.x0_prev), (fused.corr, host.corr)):
            a = np.asarray(a)
            assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(b), 1e-3)
        x, corr_seen = got, max(corr_seen, float(np.abs(host.corr).max()))
    assert np.abs(host.x0_prev).max() > 0.1 and (sampler == "dpm++" or corr_seen > 0.1)   # the state was used


def old_export(export_dir, out_dir):
    """An export dir as vdit-deploy wrote it before the model contract: the same graphs with the metadata
    keys vdit.model_config and vdit.schedule (digest over those) in place of vdit.contract and vdit.model,
    and no null_cond.safetensors."""
    import hashlib
    import json

    import onnx

    from vdit_deploy.export.metadata import read_metadata

    out_dir.mkdir()
    old_digested = ("vdit.kind", "vdit.model_config", "vdit.schedule", "vdit.io", "vdit.checkpoint_sha256",
                    "vdit.batch")
    for name in ("denoiser.onnx", "step.onnx"):
        meta = read_metadata(export_dir / name)
        props = {k: v for k, v in meta.to_props().items() if k not in ("vdit.contract", "vdit.model")}
        props.update({"vdit.model_config": meta.config.to_json(), "vdit.schedule": json.dumps(meta.schedule.to_dict())})
        props["vdit.digest"] = hashlib.sha256("\n".join(f"{k}={props[k]}" for k in old_digested).encode()).hexdigest()
        model = onnx.load(str(export_dir / name))
        del model.metadata_props[:]
        for k, v in props.items():
            model.metadata_props.add(key=k, value=v)
        onnx.save(model, str(out_dir / name))
    return out_dir


def test_export_from_before_the_contract_is_refused_with_re_export(tiny_export, tmp_path):
    from vdit_deploy.export.metadata import read_metadata
    from vdit_deploy.runtimes import open_runtime

    old = old_export(tiny_export, tmp_path / "old")
    for opening in (lambda: open_runtime("ort", old), lambda: read_metadata(old / "step.onnx")):
        with pytest.raises(VditError, match="exported by an older vdit-deploy .*re-export it") as e:
            opening()
        assert "\n" not in str(e.value)


# ---- the command line -----------------------------------------------------------------------------
def run_cli(*args):
    from click.testing import CliRunner

    from vdit_deploy.cli import main
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("args,message", [
    (["--sampler", "euler"], "sampler must be one of ddpm, ddim, dpm++, unipc, cogvideox-dpm, got 'euler'"),
    (["--sampler", "dpm++", "--order", "3"], "dpm++ order 3 is not run"),
    (["--sampler", "unipc", "--steps", "0"], "steps must be between 1 and 1000, got 0"),
    (["--sampler", "unipc", "--steps", "1001"], "steps must be between 1 and 1000, got 1001"),
    (["--sampler", "ddim", "--order", "2"], "ddim has no order option"),
    (["--spacing", "karras"], "timestep spacing must be one of linspace, leading, trailing"),
])
def test_cli_bad_sampler_input_is_one_line(tiny_checkpoint, tmp_path, args, message):
    result = run_cli("sample", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "v.npy", *args)
    assert result.exit_code == 1 and message in result.output and result.output.count("\n") == 1, result.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("sampler", ["dpm++", "unipc"])
def test_cli_ort_fused_multistep_matches_torch(tiny_checkpoint, tiny_export, tmp_path, sampler):
    """`vdit sample` with a multistep solver: the ORT fused graph (state in the graph) gives the PyTorch
    runtime's host-side video."""
    videos = {}
    for runtime, source in (("torch", ["--checkpoint", tiny_checkpoint]), ("ort", ["--onnx", tiny_export])):
        out = tmp_path / f"{runtime}.npy"
        result = run_cli("sample", *source, "--runtime", runtime, "--sampler", sampler, "--steps", 4,
                         "--label", "0,3", "--out", out)
        assert result.exit_code == 0, result.output
        assert f"4 {sampler} steps" in result.output
        videos[runtime] = np.load(out)
    assert np.linalg.norm(videos["ort"] - videos["torch"]) < 1e-4 * np.linalg.norm(videos["torch"])


def test_cli_old_export_is_refused_with_re_export(tiny_export, tmp_path):
    old = old_export(tiny_export, tmp_path / "old")
    for sampler in ("unipc", "ddim"):
        result = run_cli("sample", "--runtime", "ort", "--onnx", old, "--sampler", sampler, "--steps", 3,
                         "--out", tmp_path / "v.npy")
        assert result.exit_code == 1 and result.output.startswith("Error: ") and "re-export" in result.output, \
            result.output
        assert result.output.count("\n") == 1 and not (tmp_path / "v.npy").exists()


def test_calibration_set_follows_the_sampler(tiny_export, tmp_path):
    import json

    from vdit_deploy.calibration.collect import load_calibration_set
    from vdit_deploy.export.metadata import read_metadata

    result = run_cli("calibrate", "collect", tiny_export, "--out", tmp_path / "c", "--sampler", "unipc",
                     "--steps", 4, "--seeds", 1, "--label", "0", "--timesteps", 4)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    schedule = read_metadata(tiny_export / "denoiser.onnx").schedule
    plan = make_steps(schedule, "unipc", 4)
    assert manifest["sampler"] == "unipc" and manifest["timesteps"] == [s.t for s in plan]
    # the step graph's calibration feeds carry that plan's coefs and a state the graph accepts
    import onnxruntime as ort
    session = ort.InferenceSession(str(tiny_export / "step.onnx"), providers=["CPUExecutionProvider"])
    feeds = list(load_calibration_set(tmp_path / "c").step_batches())
    assert np.array_equal(feeds[1]["coefs"], plan[1].coefs)
    assert np.isfinite(session.run(None, feeds[1])[0]).all()


def test_compare_refuses_a_bad_sampler_before_exporting(tmp_path):
    result = run_cli("compare", "--sampler", "heun", "--out", tmp_path / "r")
    assert result.exit_code == 1 and "sampler must be one of" in result.output and not (tmp_path / "r").exists()


# ---- TensorRT: the solver state in the ping-pong buffers and CUDA graphs (GPU only) -----------------
@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["dpm++", "unipc"])
def test_trt_multistep_matches_torch_with_and_without_cuda_graph(tiny_checkpoint, tmp_path, sampler):
    from conftest import open_built, trt_skip_reason

    reason = trt_skip_reason()
    if reason:
        pytest.skip(reason)
    from vdit_deploy.export.onnx_export import export_checkpoint
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import sample

    export_dir = export_checkpoint(tiny_checkpoint, tmp_path / "export", batch=(1, 4))
    with open_runtime("torch", tiny_checkpoint, precision="fp32", device="cpu") as ref:
        plan = make_steps(ref.schedule, sampler, 8)
        want = sample(ref, ref.contract, [0, 1], plan, guidance=2.0, seed=3)
    outs = {}
    for graph in (True, False):
        with open_built(export_dir, "fp32", cuda_graph=graph) as rt:
            outs[graph] = sample(rt, rt.contract, [0, 1], plan, guidance=2.0, seed=3)
            again = sample(rt, rt.contract, [0, 1], plan, guidance=2.0, seed=3)   # the state restarts at zero
    np.testing.assert_array_equal(outs[True], outs[False])
    np.testing.assert_array_equal(outs[True], again)
    assert np.linalg.norm(outs[True] - want) < 1e-3 * np.linalg.norm(want)
