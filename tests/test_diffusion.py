import math

import numpy as np
import pytest

from vdit_deploy.diffusion import (Schedule, apply_step, ddim_steps, ddpm_steps, guide, guided_step,
                                   make_steps, timestep_subset)
from vdit_deploy.errors import VditError


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

    def denoise(x, t, y):
        calls.append(y.copy())
        return x * 0 + y[:, None].astype(np.float32)        # eps = label, so guidance is checkable

    x = np.zeros((2, 3), np.float32)
    coefs = np.array([1, 1, 1e9, 0, 0, 1, 0], np.float32)     # x_prev = eps
    out = guided_step(denoise, x, 10, np.array([1, 2], np.int32), 3.0, coefs, None, null_label=4)
    assert len(calls) == 1 and calls[0].tolist() == [1, 2, 4, 4]
    np.testing.assert_allclose(out[:, 0], [4 + 3 * (1 - 4), 4 + 3 * (2 - 4)])
    np.testing.assert_allclose(guide(np.ones(2), np.zeros(2), 1.0), np.ones(2))
