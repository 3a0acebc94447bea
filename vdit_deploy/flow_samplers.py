"""Flow matching's samplers as plans of the affine step (steps.py): each one the diffusers scheduler it
names, on that scheduler's own sigma grid (flow.py), with the model output the velocity v = noise - x0:

    x0 = x_t - sigma v                         (a = 1, b = sigma; inverted, Mochi: b = -sigma)
    euler   FlowMatchEulerDiscreteScheduler    x_next = x_t + (sigma_next - sigma) v
            = (sigma_next / sigma) x_t + (1 - sigma_next / sigma) x0; stochastic_sampling: the x0 re-noised,
            x_next = (1 - sigma_next) x0 + sigma_next z
    unipc   UniPCMultistepScheduler(use_flow_sigmas, flow_prediction), bh2, orders 1-2
    dpm++   DPMSolverMultistepScheduler(use_flow_sigmas, flow_prediction), 2M midpoint, orders 1-2

the solvers with alpha = 1 - sigma and sigma as their (alpha_t, sigma_t). The model is fed the
scheduler's timesteps: sigma * T as float32 for euler, truncated to an integer for unipc and dpm++ (as
diffusers' int64 timesteps are).
"""
from __future__ import annotations

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.flow import FLOW_SAMPLERS, FlowSchedule
from vdit_deploy.solvers import check_order, dpm_core, grid_lambdas, unipc_core
from vdit_deploy.steps import Step, coefs


def flow_steps(schedule: FlowSchedule, sampler: str | None = None, steps: int | None = None,
               order: int | None = None, prediction: str = "flow") -> list[Step]:
    """The plan of `sampler` (None: the schedule's, its pipeline's) over `steps` (None: the schedule's)."""
    sampler = schedule.sampler if sampler is None else sampler
    if sampler not in FLOW_SAMPLERS:
        raise VditError(f"a flow-matching model samples with {', '.join(FLOW_SAMPLERS)}, got {sampler!r}")
    if prediction != "flow":
        raise VditError(f"a flow-matching schedule needs a velocity (flow) model output, got {prediction}")
    steps = schedule.steps if steps is None else steps
    if sampler == "euler":
        if order is not None:
            raise VditError("euler has no order option (it is for dpm++ and unipc)")
        return euler_steps(schedule, steps)
    order = schedule.order if order is None else order
    check_order(sampler, order)
    return solver_steps(schedule, sampler, steps, order)


def _b(schedule: FlowSchedule, sigma: float) -> float:
    return -sigma if schedule.invert else sigma


def euler_steps(schedule: FlowSchedule, steps: int) -> list[Step]:
    ts, s = schedule.euler_grid(steps)
    noise_level = (1 - s.astype(np.float64)) if schedule.invert else s.astype(np.float64)
    if schedule.stochastic and schedule.invert:
        raise VditError("stochastic_sampling with invert_sigmas: diffusers re-noises with the inverted sigma, "
                        "which is not a noise level; not reproduced")
    if np.any(noise_level[:-1] <= 0):
        raise VditError(f"{steps} steps of this flow schedule visit sigma 0 before the end")
    out = []
    for i, t in enumerate(ts.tolist()):
        sig, nxt = noise_level[i], noise_level[i + 1]
        if schedule.stochastic:
            c = coefs(1.0, _b(schedule, sig), None, c_x0=1 - nxt, sigma=nxt)
        else:
            c = coefs(1.0, _b(schedule, sig), None, c_x0=1 - nxt / sig, c_xt=nxt / sig)
        out.append(Step(float(t), c))
    return out


def solver_steps(schedule: FlowSchedule, sampler: str, steps: int, order: int) -> list[Step]:
    if schedule.invert:
        raise VditError(f"invert_sigmas is a FlowMatchEulerDiscreteScheduler option: {sampler} does not run it")
    ts, s = schedule.grid(sampler, steps)
    sigma = s[:-1].astype(np.float64)
    alpha, sigma_g, lam = grid_lambdas(1 - sigma, sigma)
    core = dpm_core if sampler == "dpm++" else unipc_core
    return [Step(float(t), coefs(1.0, float(sig), None, **c), multistep=True)
            for t, sig, c in zip(ts.tolist(), sigma, core(alpha, sigma_g, lam, order))]
