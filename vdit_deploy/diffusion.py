"""Diffusion math in numpy (no torch): schedules, q(x_t|x_0), posteriors, DDPM and DDIM steps.

Every sampler step, DDPM or DDIM, is written as the same affine update

    x0_hat  = clip(a * x_t - b * eps, -clip, +clip)
    eps_hat = (a * x_t - x0_hat) / b          # eps consistent with the clipped x0 (= eps if no clipping)
    x_prev  = c_x0 * x0_hat + c_xt * x_t + c_eps * eps_hat + sigma * z

so that any runtime (numpy, an ONNX graph, a TensorRT engine) implements one formula and the host only
feeds the step's scalars. The eps-prediction MSE loss lives with training (torch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vdit_deploy.errors import VditError

SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    kind: str = "linear"
    num_timesteps: int = 1000

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise VditError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")
        if self.num_timesteps < 2:
            raise VditError(f"num_timesteps must be >= 2, got {self.num_timesteps}")

    @property
    def betas(self) -> np.ndarray:
        T = self.num_timesteps
        if self.kind == "linear":
            # Ho et al. 2020: 1e-4 .. 0.02 over T=1000; scaled so other T keep the same end points' product.
            scale = 1000.0 / T
            return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
        # Nichol & Dhariwal 2021: alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2), betas clipped at 0.999
        s = 0.008
        steps = np.arange(T + 1, dtype=np.float64) / T
        f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return np.clip(1 - f[1:] / f[:-1], 0.0, 0.999)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    def alpha_bar(self, t) -> np.ndarray:
        """alpha_bar_t, with alpha_bar at t = -1 equal to 1 (the clean video)."""
        t = np.asarray(t)
        return np.where(t >= 0, self.alphas_cumprod[np.maximum(t, 0)], 1.0)

    def q_sample(self, x0: np.ndarray, t, noise: np.ndarray) -> np.ndarray:
        """x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I); t broadcasts over the batch axis."""
        ab = self.alpha_bar(t).reshape(-1, *([1] * (x0.ndim - 1)))
        return (np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise).astype(x0.dtype)

    def posterior(self, t: int) -> tuple[float, float, float]:
        """q(x_{t-1} | x_t, x_0) = N(c0 x_0 + ct x_t, var): returns (c0, ct, var)."""
        beta, ab, ab_prev = self.betas[t], self.alpha_bar(t), self.alpha_bar(t - 1)
        c0 = beta * math.sqrt(ab_prev) / (1 - ab)
        ct = (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)
        var = beta * (1 - ab_prev) / (1 - ab)
        return float(c0), float(ct), float(var)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "num_timesteps": self.num_timesteps}


# ---- samplers as sequences of affine steps ---------------------------------------------------
COEF_NAMES = ("a", "b", "clip", "c_x0", "c_xt", "c_eps", "sigma")
SAMPLERS = ("ddpm", "ddim")


@dataclass(frozen=True)
class Step:
    t: int            # the timestep fed to the denoiser
    coefs: np.ndarray  # float32 (7,) in COEF_NAMES order

    @property
    def sigma(self) -> float:
        return float(self.coefs[6])


def timestep_subset(num_timesteps: int, steps: int) -> np.ndarray:
    """Evenly spaced, descending timesteps for a respaced sampler (DDIM's "uniform" skip)."""
    if not 1 <= steps <= num_timesteps:
        raise VditError(f"steps must be between 1 and {num_timesteps}, got {steps}")
    ts = np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int64)
    return ts[::-1].copy()


def _x0_coefs(schedule: Schedule, t: int) -> tuple[float, float]:
    ab = float(schedule.alpha_bar(t))
    return 1.0 / math.sqrt(ab), math.sqrt(1.0 / ab - 1.0)


def ddpm_steps(schedule: Schedule, clip: float = 1.0) -> list[Step]:
    """Ancestral sampling over all T steps: x_{t-1} = posterior mean(x0_hat, x_t) + sqrt(var) z."""
    out = []
    for t in range(schedule.num_timesteps - 1, -1, -1):
        a, b = _x0_coefs(schedule, t)
        c0, ct, var = schedule.posterior(t)
        out.append(Step(t, np.array([a, b, clip, c0, ct, 0.0, math.sqrt(var)], np.float32)))
    return out


def ddim_steps(schedule: Schedule, steps: int, eta: float = 0.0, clip: float = 1.0) -> list[Step]:
    """DDIM (Song et al. 2021) over a respaced subset; eta=0 is deterministic, eta=1 is DDPM-like."""
    if eta < 0:
        raise VditError(f"eta must be >= 0, got {eta}")
    ts = timestep_subset(schedule.num_timesteps, steps)
    out = []
    for i, t in enumerate(ts):
        t_prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
        ab, ab_prev = float(schedule.alpha_bar(t)), float(schedule.alpha_bar(t_prev))
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
        a, b = _x0_coefs(schedule, int(t))
        c_eps = math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0))
        out.append(Step(int(t), np.array([a, b, clip, math.sqrt(ab_prev), 0.0, c_eps, sigma], np.float32)))
    return out


def make_steps(schedule: Schedule, sampler: str, steps: int | None = None, eta: float = 0.0,
               clip: float = 1.0) -> list[Step]:
    if sampler == "ddpm":
        if steps not in (None, schedule.num_timesteps):
            raise VditError(f"ddpm runs all {schedule.num_timesteps} steps; use --sampler ddim for {steps}")
        return ddpm_steps(schedule, clip)
    if sampler == "ddim":
        return ddim_steps(schedule, 50 if steps is None else steps, eta, clip)
    raise VditError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")


def apply_step(x_t: np.ndarray, eps: np.ndarray, coefs: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
    """The affine update above, in float32 (what every runtime computes)."""
    a, b, clip, c_x0, c_xt, c_eps, sigma = (np.float32(v) for v in coefs)
    ax = a * x_t
    x0 = np.clip(ax - b * eps, -clip, clip)
    eps_hat = (ax - x0) / b     # re-derived as in guided-diffusion: keeps DDIM(eta=1) == DDPM with clipping
    x_prev = c_x0 * x0 + c_xt * x_t + c_eps * eps_hat
    if sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev.astype(np.float32)


def guide(eps_cond: np.ndarray, eps_null: np.ndarray, scale: float) -> np.ndarray:
    """Classifier-free guidance (Ho & Salimans): eps_null + s (eps_cond - eps_null)."""
    return eps_null + np.float32(scale) * (eps_cond - eps_null)


def guided_step(denoise, x_t: np.ndarray, t: int, y: np.ndarray, guidance: float, coefs: np.ndarray,
                noise: np.ndarray | None, null_label: int) -> np.ndarray:
    """One sampler step driven by any `denoise(x_t, t, y) -> eps` on numpy arrays.
    With guidance != 1 the conditional and null-label passes run as one batch of 2B."""
    b = x_t.shape[0]
    if guidance == 1.0:
        eps = denoise(x_t, np.full(b, t, np.float32), y)
    else:
        both = denoise(np.concatenate([x_t, x_t]), np.full(2 * b, t, np.float32),
                       np.concatenate([y, np.full(b, null_label, y.dtype)]))
        eps = guide(both[:b], both[b:], guidance)
    return apply_step(x_t, eps, coefs, noise)
