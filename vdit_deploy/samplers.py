"""The samplers of DDPM-family schedules in numpy (no torch): DDPM, DDIM, DPM-Solver++ (2M), UniPC (bh2)
and CogVideoX's SDE-DPM-Solver++ as plans of coefficients of the affine step (steps.py, where the update
every runtime applies is written), and make_steps, a plan by name for any schedule (flow matching's
plans: flow_samplers.py). Schedules and timestep spacing live in schedules.py and flow.py.
"""
from __future__ import annotations

import math

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.schedules import LAMBDA_MIN, SPACINGS, Schedule, check_steps, solver_timesteps, timestep_subset
from vdit_deploy.solvers import MULTISTEP_ORDERS, check_order, dpm_core, grid_lambdas, unipc_core
from vdit_deploy.steps import (COEF_NAMES, MULTISTEP_COEFS, SINGLE_STEP_COEFS, SolverState, Step,  # noqa: F401
                               apply_step, coefs as _coefs, guide, guided_step)

# DDPM-family samplers; cogvideox-dpm is CogVideoXDPMScheduler (SDE-DPM-Solver++ 2M); flow matching's
# (euler, unipc, dpm++) are in flow_samplers.py
SAMPLERS = ("ddpm", "ddim", "dpm++", "unipc", "cogvideox-dpm")
PREDICTIONS = ("eps", "v", "x0", "flow")
# From the quality-per-step table (README): UniPC at 15 steps and DPM-Solver++ at 20 come as close to
# 250-step DDIM as DDIM at 50 does.
DEFAULT_SAMPLER = "unipc"
DEFAULT_STEPS = {"ddim": 50, "dpm++": 20, "unipc": 15, "cogvideox-dpm": 50}


def _prediction_coefs(schedule: Schedule, t: int, prediction: str) -> tuple[float, float]:
    """(a, b) with x0 = a * x_t - b * out, for a model predicting eps, v (Salimans & Ho 2022) or x0."""
    ab = float(schedule.alpha_bar(t))
    if prediction == "eps":
        return 1.0 / math.sqrt(ab), math.sqrt(1.0 / ab - 1.0)
    if prediction == "v":
        return math.sqrt(ab), math.sqrt(1.0 - ab)
    if prediction == "x0":
        return 0.0, -1.0
    raise VditError(f"prediction must be one of {', '.join(PREDICTIONS[:3])} on a DDPM schedule, got {prediction!r}")


def _ddim_coefs(schedule: Schedule, t: int, prediction: str, clip: float, c_x0: float, c_xt: float,
                c_eps: float, sigma: float, **learned) -> np.ndarray:
    """DDPM/DDIM coefficients written for eps; for a v or x0 model the eps term becomes x0 and x_t terms,
    eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab), since eps_hat would be v or x0 there."""
    a, b = _prediction_coefs(schedule, t, prediction)
    if prediction != "eps" and c_eps:
        ab = float(schedule.alpha_bar(t))
        c_x0, c_xt, c_eps = c_x0 - c_eps * math.sqrt(ab / (1 - ab)), c_xt + c_eps / math.sqrt(1 - ab), 0.0
    return _coefs(a, b, clip, c_x0, c_xt, c_eps, sigma, **learned)


def ddpm_steps(schedule: Schedule, clip: float | None = 1.0, prediction: str = "eps",
               learned_variance: bool = False) -> list[Step]:
    """Ancestral sampling over all T steps: x_{t-1} = posterior mean(x0_hat, x_t) + std z, std the
    posterior's sqrt(var), or with learned_variance the model's: log var between log(var) (clamped at
    1e-20, as diffusers does) and log(beta_t). No noise at t = 0."""
    out = []
    for t in range(schedule.num_timesteps - 1, -1, -1):
        c0, ct, var = schedule.posterior(t)
        if learned_variance and t > 0:
            noise = dict(sigma=0.0, learned_var=1.0, log_var_min=math.log(max(var, 1e-20)),
                         log_var_max=math.log(schedule.betas[t]))
        else:
            noise = dict(sigma=math.sqrt(var))
        out.append(Step(int(t), _ddim_coefs(schedule, t, prediction, clip, c0, ct, 0.0, **noise)))
    return out


def ddim_timesteps(T: int, steps: int, spacing: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, the ones each step goes to; -1: the clean video). linspace (or None): evenly spaced
    with t = 0, each step to the next. leading / trailing: diffusers' DDIMScheduler (and CogVideoX's),
    whose step goes to t - T // steps whatever the next timestep is. (diffusers' linspace DDIM also steps
    to t - T // steps, which skips past the next timestep; the reading of its configs refuses it.)"""
    check_steps(T, steps)
    if spacing in (None, "linspace"):
        ts = timestep_subset(T, steps)
        return ts, np.append(ts[1:], -1)
    if spacing == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64)
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    else:
        raise VditError(f"timestep spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    return ts, ts - T // steps


def ddim_steps(schedule: Schedule, steps: int, eta: float = 0.0, clip: float | None = 1.0,
               prediction: str = "eps", spacing: str | None = None) -> list[Step]:
    """DDIM (Song et al. 2021) over a respaced subset; eta=0 is deterministic, eta=1 is DDPM-like.
    With a spacing, the timesteps of diffusers' DDIMScheduler (set_alpha_to_one; its step reuses the
    model's eps where x0 was clipped, this one re-derives eps from the clipped x0)."""
    if eta < 0:
        raise VditError(f"eta must be >= 0, got {eta}")
    ts, prev = ddim_timesteps(schedule.num_timesteps, steps, spacing)
    out = []
    for t, t_prev in zip(ts.tolist(), prev.tolist()):
        ab, ab_prev = float(schedule.alpha_bar(t)), float(schedule.alpha_bar(t_prev))
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
        c_eps = math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0))
        out.append(Step(int(t), _ddim_coefs(schedule, t, prediction, clip, math.sqrt(ab_prev), 0.0, c_eps, sigma)))
    return out


def cogvideox_dpm_steps(schedule: Schedule, steps: int = 50, clip: float | None = None, prediction: str = "v",
                        spacing: str = "trailing") -> list[Step]:
    """CogVideoXDPMScheduler: SDE-DPM-Solver++(2M) (Lu et al. 2022) with h = lambda_next - lambda,
    lambda = log(sqrt(ab / (1 - ab))), from t to t - T // steps:
        x_next = sqrt((1 - ab_next) / (1 - ab)) e^-h x - expm1(-2h) sqrt(ab_next) D + sqrt(1 - ab_next)
                 sqrt(1 - e^-2h) z,   D = x0 (first step, last step) or (1 + 1/2r) x0 - x0_prev / 2r,
    r = (lambda - lambda_back) / h, lambda_back at the previous timestep."""
    ts, prev = ddim_timesteps(schedule.num_timesteps, steps, spacing)
    ab = [float(schedule.alpha_bar(t)) for t in ts]
    out = []
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = lambda a: 0.5 * (np.log(np.float64(a)) - np.log1p(-np.float64(a)))     # noqa: E731
        for i, (t, t_prev) in enumerate(zip(ts.tolist(), prev.tolist())):
            ab_next = float(schedule.alpha_bar(t_prev))
            h = lam(ab_next) - lam(ab[i])
            mult1 = math.sqrt((1 - ab_next) / (1 - ab[i])) * float(np.exp(-h))
            mult2 = float(np.expm1(-2 * h)) * math.sqrt(ab_next)
            noise = math.sqrt(1 - ab_next) * math.sqrt(float(-np.expm1(-2 * h)))
            c_x0, c_x0_prev = -mult2, 0.0
            if i > 0 and t_prev >= 0:
                r = (lam(ab[i]) - lam(ab[i - 1])) / h
                half = 0.0 if np.isinf(r) else float(1 / (2 * r))
                c_x0, c_x0_prev = -mult2 * (1 + half), mult2 * half
            a, b = _prediction_coefs(schedule, t, prediction)
            out.append(Step(int(t), _coefs(a, b, clip, c_x0=c_x0, c_xt=mult1, sigma=noise, c_x0_prev=c_x0_prev),
                            multistep=True))
    return out


def _solver_grid(schedule: Schedule, steps: int, spacing: str, lambda_min: float):
    """Timesteps and per-point (alpha, sigma, lambda) with the clean end appended (lambda = inf). A
    zero-terminal-SNR alpha_bar is 2^-24 at T (diffusers' solvers: the first lambda stays finite)."""
    ts = solver_timesteps(schedule, steps, spacing, lambda_min)
    ab = schedule.alpha_bar(ts).astype(np.float64)
    if schedule.zero_snr:
        ab = np.where(ts == schedule.num_timesteps - 1, np.maximum(ab, 2.0 ** -24), ab)
    return ts, *grid_lambdas(np.sqrt(ab), np.sqrt(1 - ab))


def _multistep(core, schedule: Schedule, steps: int, order: int, spacing: str, prediction: str, clip,
               lambda_min: float) -> list[Step]:
    """A multistep solver's `core` (alpha, sigma, lambda, order -> each step's coefficients) over
    diffusers' timesteps of a DDPM schedule, with the model's prediction type."""
    ts, alpha, sigma, lam = _solver_grid(schedule, steps, spacing, lambda_min)
    return [Step(int(t), _coefs(*_prediction_coefs(schedule, int(t), prediction), clip, **c), multistep=True)
            for t, c in zip(ts, core(alpha, sigma, lam, order))]


def dpm_solver_steps(schedule: Schedule, steps: int = 20, order: int = 2, spacing: str = "linspace",
                     prediction: str = "eps", clip: float | None = 1.0, lambda_min: float = LAMBDA_MIN) -> list[Step]:
    """DPM-Solver++(2M) on a DDPM schedule (dpm_core) over diffusers' timesteps."""
    check_order("dpm++", order)
    return _multistep(dpm_core, schedule, steps, order, spacing, prediction, clip, lambda_min)


def unipc_steps(schedule: Schedule, steps: int = 20, order: int = 2, spacing: str = "linspace",
                prediction: str = "eps", clip: float | None = 1.0, lambda_min: float = LAMBDA_MIN) -> list[Step]:
    """UniPC-bh2 on a DDPM schedule (solvers.unipc_core) over diffusers' timesteps."""
    check_order("unipc", order)
    return _multistep(unipc_core, schedule, steps, order, spacing, prediction, clip, lambda_min)


def make_steps(schedule, sampler: str, steps: int | None = None, eta: float = 0.0,
               clip: float | None = 1.0, order: int | None = None, spacing: str | None = None,
               prediction: str = "eps", lambda_min: float | None = LAMBDA_MIN,
               learned_variance: bool = False) -> list[Step]:
    """The plan of a sampler: ddpm (all T steps; learned_variance for a learned-sigma model), ddim (eta;
    spacing None: evenly spaced with t = 0, or diffusers' linspace / leading / trailing), the multistep
    ODE solvers dpm++ and unipc (order, spacing, lambda_min: None for no clipping), cogvideox-dpm; on a
    FlowSchedule euler, unipc or dpm++ (flow_samplers.py). steps None: the sampler's default."""
    if schedule.kind == "flow":
        from vdit_deploy.flow_samplers import flow_steps   # flow_samplers builds on this module's plans

        if eta or spacing is not None or learned_variance:
            what = "eta" if eta else "a timestep spacing" if spacing is not None else "learned variance"
            raise VditError(f"a flow-matching model's samplers take no {what} (its sigmas come from the schedule)")
        return flow_steps(schedule, sampler, steps, order, prediction)
    if sampler not in SAMPLERS:
        extra = " (euler is for flow-matching models)" if sampler == "euler" else ""
        raise VditError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}{extra}")
    if prediction == "flow":
        raise VditError("a flow-velocity model needs a flow-matching schedule (FlowSchedule), not DDPM betas")
    if learned_variance and sampler != "ddpm":
        raise VditError(f"learned variance is for ddpm's ancestral steps; {sampler} ignores a model's variance "
                        "channels (sample without learned_variance)")
    if order is not None and sampler not in MULTISTEP_ORDERS:
        raise VditError(f"{sampler} has no order option (it is for {' and '.join(MULTISTEP_ORDERS)})")
    if spacing is not None and sampler == "ddpm":
        raise VditError("ddpm has no timestep spacing option (it runs all T steps)")
    lambda_min = -math.inf if lambda_min is None else lambda_min
    if sampler == "ddpm":
        if steps not in (None, schedule.num_timesteps):
            raise VditError(f"ddpm runs all {schedule.num_timesteps} steps; use --sampler ddim for {steps}")
        return ddpm_steps(schedule, clip, prediction, learned_variance)
    steps = DEFAULT_STEPS[sampler] if steps is None else steps
    if sampler == "ddim":
        return ddim_steps(schedule, steps, eta, clip, prediction, spacing)
    if eta:
        raise VditError(f"{sampler} is a {'stochastic' if sampler == 'cogvideox-dpm' else 'deterministic ODE'} "
                        f"solver with its own noise: eta must be 0, got {eta}")
    if sampler == "cogvideox-dpm":
        return cogvideox_dpm_steps(schedule, steps, clip, prediction, spacing or "trailing")
    solver = dpm_solver_steps if sampler == "dpm++" else unipc_steps
    return solver(schedule, steps, 2 if order is None else order, spacing or "linspace", prediction, clip, lambda_min)
