import math

import numpy as np
import pytest

from vdit_deploy import validate
from vdit_deploy.errors import VditError
from vdit_deploy.scheduler_config import read_scheduler_config
from vdit_deploy.samplers import apply_step, ddim_steps, ddpm_steps, guide, guided_step, make_steps
from vdit_deploy.schedules import Schedule, timestep_subset


def test_linear_schedule_alpha_bar_at_T():
    sched = Schedule("linear", 1000)
    betas = 1e-4 + (0.02 - 1e-4) * np.arange(1000) / 999          # Ho et al.'s closed form
    assert sched.betas[0] == pytest.approx(1e-4) and sched.betas[-1] == pytest.approx(0.02)
    assert sched.alphas_cumprod[-1] == pytest.approx(math.exp(np.log1p(-betas).sum()), rel=1e-12)
    assert 3e-5 < sched.alphas_cumprod[-1] < 5e-5                 # x_T is nearly pure noise


def test_cosine_schedule_follows_closed_form():
    sched = Schedule("cosine", 1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 100, 500, 900):
        assert sched.alphas_cumprod[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_posterior_variance_formula():
    sched = Schedule()
    ab = sched.alphas_cumprod
    for t in (1, 10, 500, 999):
        c0, ct, var = sched.posterior(t)
        assert var == pytest.approx((1 - ab[t - 1]) / (1 - ab[t]) * sched.betas[t], rel=1e-12)
        # the posterior mean is exact for x_t built from x0: mean(x0, x_t) with noise 0 gives back sqrt(ab_{t-1}) x0
        assert c0 + ct * math.sqrt(ab[t]) == pytest.approx(math.sqrt(ab[t - 1]), rel=1e-9)
    assert sched.posterior(0)[2] == 0.0


def test_q_sample_moments():
    sched = Schedule()
    rng = np.random.default_rng(0)
    x0 = np.full((20000, 1), 0.5, np.float32)
    xt = sched.q_sample(x0, np.full(20000, 300), rng.standard_normal(x0.shape).astype(np.float32))
    assert xt.mean() == pytest.approx(0.5 * math.sqrt(sched.alphas_cumprod[300]), abs=0.02)
    assert xt.var() == pytest.approx(1 - sched.alphas_cumprod[300], rel=0.05)


def test_ddim_eta1_on_full_schedule_equals_ddpm():
    sched = Schedule("linear", 1000)
    ddim, ddpm = ddim_steps(sched, 1000, eta=1.0), ddpm_steps(sched)
    rng = np.random.default_rng(0)
    x_t, eps, z = (rng.standard_normal((2, 8)).astype(np.float32) for _ in range(3))
    for i in (0, 1, 500, 998, 999):
        assert ddim[i].t == ddpm[i].t
        assert ddim[i].sigma == pytest.approx(ddpm[i].sigma, rel=1e-5)
        np.testing.assert_allclose(apply_step(x_t, eps, ddim[i].coefs, z), apply_step(x_t, eps, ddpm[i].coefs, z),
                                   rtol=2e-4, atol=2e-5)


def test_ddim_eta0_is_deterministic_and_exact_for_true_noise():
    sched = Schedule()
    steps = ddim_steps(sched, 20, eta=0.0)
    assert all(s.sigma == 0 for s in steps)
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-0.9, 0.9, (2, 16)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    x = sched.q_sample(x0, np.full(2, steps[0].t), eps)
    # with the true eps, the deterministic DDIM update stays on the same trajectory and lands on x0
    for s in steps:
        x = apply_step(x, eps, s.coefs, noise=rng.standard_normal(x.shape).astype(np.float32))
        ab_prev = sched.alpha_bar(steps[steps.index(s) + 1].t) if s is not steps[-1] else 1.0
        np.testing.assert_allclose(x, math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps, atol=2e-4)
    np.testing.assert_allclose(x, x0, atol=1e-4)


def test_timestep_subset_and_ranges():
    ts = timestep_subset(1000, 50)
    assert ts[0] == 999 and ts[-1] == 0 and len(np.unique(ts)) == 50 and np.all(np.diff(ts) < 0)
    for bad in (0, 1001):
        with pytest.raises(VditError, match="steps must be between 1 and 1000"):
            timestep_subset(1000, bad)
    with pytest.raises(VditError, match="ddpm runs all 1000 steps"):
        make_steps(Schedule(), "ddpm", 50)


def test_guidance_batches_cond_and_null():
    calls = []

    def denoise(x, t, cond):
        calls.append({k: v.copy() for k, v in cond.items()})
        return x * 0 + cond["y"][:, None].astype(np.float32) + cond["mask"][:, :1]   # eps = label (+1): checkable

    x = np.zeros((2, 3), np.float32)
    coefs = np.array([1, 1, 1e9, 0, 0, 1, 0], np.float32)     # x_prev = eps
    cond = {"y": np.array([1, 2], np.int32), "mask": np.ones((2, 5), np.float32)}
    null = {"y": np.array([4, 4], np.int32), "mask": np.zeros((2, 5), np.float32)}
    out = guided_step(denoise, x, 10, cond, null, 3.0, coefs, None)
    assert len(calls) == 1 and calls[0]["y"].tolist() == [1, 2, 4, 4]                  # one 2B batch
    assert calls[0]["mask"][:, 0].tolist() == [1, 1, 0, 0]                             # every input paired
    np.testing.assert_allclose(out[:, 0], [4 + 3 * (2 - 4), 4 + 3 * (3 - 4)])
    # guidance 1: one B pass, no null needed
    calls.clear()
    np.testing.assert_allclose(guided_step(denoise, x, 10, cond, None, 1.0, coefs, None)[:, 0], [2, 3])
    assert len(calls) == 1 and calls[0]["y"].tolist() == [1, 2]
    with pytest.raises(VditError, match="null conditioning"):
        guided_step(denoise, x, 10, cond, None, 3.0, coefs, None)
    np.testing.assert_allclose(guide(np.ones((2, 1)), np.zeros((2, 1)), 1.0), np.ones((2, 1)))


def test_guide_takes_a_learned_variance_from_the_conditional_pass():
    """eps+var output (2C channels): guidance on eps only; the variance channels are the cond pass's
    (guiding them could push them out of [-1, 1])."""
    rng = np.random.default_rng(0)
    out_cond, out_null = rng.standard_normal((2, 2, 3, 4)), rng.standard_normal((2, 2, 3, 4))   # C = 1
    got = guide(out_cond, out_null, 4.0, channels=1)
    np.testing.assert_allclose(got[:, :1], out_null[:, :1] + 4.0 * (out_cond[:, :1] - out_null[:, :1]), rtol=1e-6)
    np.testing.assert_array_equal(got[:, 1:], out_cond[:, 1:])


# ---- schedules from diffusers' scheduler_config.json -------------------------------------------------
@pytest.mark.parametrize("config", [
    {"beta_schedule": "linear"},                                           # diffusers' defaults: 1e-4 .. 0.02
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 500},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},   # latent diffusion's
    {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000, "beta_start": 0.5},   # ends ignored
])
def test_from_diffusers_betas_are_diffusers_betas(config):
    from diffusers import DDPMScheduler

    schedule, prediction, variance = read_scheduler_config({**config, "prediction_type": "v_prediction",
                                                              "variance_type": "learned_range"})
    theirs = DDPMScheduler(**config)
    assert (prediction, variance) == ("v", "learned_range") and schedule.num_timesteps == len(theirs.betas)
    # diffusers' betas are float32; ours float64
    np.testing.assert_allclose(schedule.betas, theirs.betas.double().numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(schedule.alphas_cumprod, theirs.alphas_cumprod.double().numpy(), rtol=2e-5)


def test_from_diffusers_names_and_defaults():
    assert read_scheduler_config({}) == (Schedule("linear", 1000, 1e-4, 0.02), "eps", "fixed")
    for name, ours in (("epsilon", "eps"), ("v_prediction", "v"), ("sample", "x0")):
        assert read_scheduler_config({"prediction_type": name})[1] == ours
    for name in (None, "fixed_small", "fixed_small_log"):
        assert read_scheduler_config({"variance_type": name})[2] == "fixed"
    # the beta end points equal to the built-in linear schedule's give its betas, and only set ones are saved
    assert np.array_equal(read_scheduler_config({})[0].betas, Schedule().betas)
    assert Schedule().to_dict() == {"kind": "linear", "num_timesteps": 1000}
    scaled = Schedule("scaled_linear", 1000, 0.00085, 0.012)
    assert scaled.to_dict() == {"kind": "scaled_linear", "num_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
    assert Schedule.from_dict(scaled.to_dict()) == scaled and Schedule.from_dict(Schedule().to_dict()) == Schedule()


@pytest.mark.parametrize("config,message", [
    ({"beta_schedule": "sigmoid"}, "beta_schedule must be one of linear, scaled_linear, squaredcos_cap_v2, got 'sigmoid'"),
    ({"prediction_type": "flow"}, "prediction_type must be one of epsilon, v_prediction, sample, got 'flow'"),
    ({"variance_type": "learned"}, "variance_type must be one of fixed_small, fixed_small_log, learned_range "
                                   r"\(or absent\), got 'learned'"),
    ({"variance_type": "fixed_large"}, "variance_type must be one of .*got 'fixed_large'"),
    ({"variance_type": ["learned_range"]}, "variance_type must be one of .*got \\['learned_range'\\]"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas are not supported"),
    ({"thresholding": True}, "thresholding True: dynamic thresholding is not reproduced"),
    ({"num_train_timesteps": 1}, "num_train_timesteps must be between 2 and 100000, got 1"),
    ({"beta_start": "0.1"}, "beta_start must be a number, got '0.1'"),
    ({"beta_start": 0.02, "beta_end": 0.01}, "0 < beta_start < beta_end < 1, got 0.02 and 0.01"),
    ([], "scheduler config must be a JSON object"),
])
def test_from_diffusers_refuses_what_it_cannot_reproduce(config, message):
    with pytest.raises(VditError, match=message) as e:
        read_scheduler_config(config)
    assert "\n" not in str(e.value) and (config == [] or str(e.value).startswith("scheduler config (DDPMScheduler): "))


@pytest.mark.parametrize("data,message", [
    ({"kind": "linear", "num_timesteps": 1000, "beta_start": 0.0, "beta_end": 0.02}, "beta_start must be > 0 and <= 1"),
    ({"kind": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": float("nan")}, "beta_end must be a finite"),
    ({"kind": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 1.0}, "beta_start < beta_end < 1"),
    ({"kind": "linear", "num_timesteps": 1000, "beta_start": 1e-4}, "beta_start and beta_end go together"),
    ({"kind": "cosine", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}, "cosine schedule has no beta_start"),
    ({"kind": "scaled_linear", "num_timesteps": 1000, "beta_start": True, "beta_end": 0.02}, "beta_start must be a number"),
])
def test_schedule_json_checks_the_beta_ends(data, message):
    with pytest.raises(VditError, match=message) as e:
        Schedule.from_dict(data, "export metadata")
    assert "\n" not in str(e.value) and str(e.value).startswith("export metadata: ")


def test_x0_prediction_ddpm_and_ddim_take_the_model_output_as_x0():
    """An x0 model's output is the (clipped) data prediction: DDPM's posterior mean and DDIM's update
    written from it alone."""
    sched = Schedule("cosine", 1000)
    rng = np.random.default_rng(3)
    x_t, x0 = rng.standard_normal((2, 8)).astype(np.float32), rng.uniform(-1.5, 1.5, (2, 8)).astype(np.float32)
    clipped = np.clip(x0, -1, 1)
    for step in ddpm_steps(sched, prediction="x0")[::250]:
        c0, ct, _ = sched.posterior(step.t)
        np.testing.assert_allclose(apply_step(x_t, x0, step.coefs, np.zeros_like(x_t)), c0 * clipped + ct * x_t,
                                   rtol=1e-5, atol=1e-6)
    plan = ddim_steps(sched, 10, prediction="x0")
    for i, step in enumerate(plan):
        ab, ab_prev = sched.alpha_bar(step.t), sched.alpha_bar(plan[i + 1].t if i + 1 < len(plan) else -1)
        eps = (x_t - math.sqrt(ab) * clipped) / math.sqrt(1 - ab)
        np.testing.assert_allclose(apply_step(x_t, x0, step.coefs, None),
                                   math.sqrt(ab_prev) * clipped + math.sqrt(1 - ab_prev) * eps, rtol=1e-5, atol=1e-5)
