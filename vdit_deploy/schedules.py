"""Noise schedules in numpy (no torch): betas and alpha_bar of a DDPM-family schedule, q(x_t|x_0) and the
posterior, the timesteps a sampler visits, and the reading of a diffusers scheduler_config.json.
What a sampler does at each of those timesteps lives in samplers.py."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vdit_deploy import validate as v
from vdit_deploy.errors import VditError

SCHEDULES = ("linear", "scaled_linear", "cosine")
# scheduler_config.json's names (diffusers) for ours
DIFFUSERS_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
VARIANCES = ("fixed", "learned_range")    # the model's variance: the posterior's, or learned in 2C channels
DIFFUSERS_VARIANCES = {None: "fixed", "fixed_small": "fixed", "fixed_small_log": "fixed",
                       "learned_range": "learned_range"}

SPACINGS = ("linspace", "leading", "trailing")
# The solvers start where log(alpha/sigma) >= LAMBDA_MIN (diffusers' lambda_min_clipped): below it an
# eps model's x0 = (x_t - sigma eps) / alpha is its error times sigma/alpha (2e4 at cosine's t=999), and
# a few-step solver weights that x0 by the next step's alpha. -3.5 (signal 3% of the noise; Stable
# Diffusion's samplers start at -2.7) was the best of -inf..-3 on the shipped checkpoint (README).
LAMBDA_MIN = -3.5


@dataclass(frozen=True)
class Schedule:
    kind: str = "linear"
    num_timesteps: int = 1000
    # linear and scaled_linear end points; None: Ho et al.'s 1e-4 .. 0.02, scaled by 1000 / num_timesteps
    beta_start: float | None = None
    beta_end: float | None = None

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise VditError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")
        if self.num_timesteps < 2:
            raise VditError(f"num_timesteps must be >= 2, got {self.num_timesteps}")
        ends = (self.beta_start, self.beta_end)
        if ends == (None, None):
            return
        if self.kind == "cosine":
            raise VditError("the cosine schedule has no beta_start/beta_end")
        if None in ends:
            raise VditError(f"beta_start and beta_end go together, got {self.beta_start} and {self.beta_end}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise VditError(f"beta_start and beta_end must satisfy 0 < beta_start < beta_end < 1, "
                            f"got {self.beta_start} and {self.beta_end}")

    @classmethod
    def from_diffusers(cls, config: dict, where: str = "scheduler config") -> tuple["Schedule", str, str]:
        """(schedule, prediction, variance) from a diffusers scheduler_config.json dict, with diffusers'
        defaults for absent keys. What it cannot reproduce is refused, not approximated."""
        v.obj(config, where, where="", extra_ok=True)
        if config.get("trained_betas") is not None:
            v.fail(where, "trained_betas are not supported (name a beta_schedule)")
        if config.get("rescale_betas_zero_snr"):
            v.fail(where, "rescale_betas_zero_snr is not supported")
        T = v.integer(config.get("num_train_timesteps", 1000), "num_train_timesteps", 2, 100_000, where)
        kind = DIFFUSERS_SCHEDULES[v.string(config.get("beta_schedule", "linear"), "beta_schedule",
                                            DIFFUSERS_SCHEDULES, where)]
        prediction = DIFFUSERS_PREDICTIONS[v.string(config.get("prediction_type", "epsilon"), "prediction_type",
                                                    DIFFUSERS_PREDICTIONS, where)]
        variance = config.get("variance_type")
        if not (variance is None or isinstance(variance, str)) or variance not in DIFFUSERS_VARIANCES:
            v.fail(where, f"variance_type must be one of {', '.join(k for k in DIFFUSERS_VARIANCES if k)} "
                          f"(or absent), got {v.show(variance)}")
        ends = {}
        if kind != "cosine":    # diffusers ignores them for squaredcos_cap_v2
            ends = {k: v.number(config.get(k, d), k, where=where) for k, d in (("beta_start", 1e-4), ("beta_end", 0.02))}
        try:
            return cls(kind, T, **ends), prediction, DIFFUSERS_VARIANCES[variance]
        except VditError as e:
            v.fail(where, str(e))

    @classmethod
    def from_dict(cls, data, where: str = "") -> "Schedule":
        """A Schedule from its JSON dict (to_dict's), checked as untrusted input."""
        v.obj(data, "schedule", required=("kind", "num_timesteps"), where=where, extra_ok=True)
        v.string(data["kind"], "schedule kind", SCHEDULES, where)
        v.integer(data["num_timesteps"], "num_timesteps", 2, 100_000, where)
        for name in ("beta_start", "beta_end"):       # optional; absent in exports from before them
            if data.get(name) is not None:
                v.number(data[name], name, 0, 1, lo_open=True, where=where)
        try:
            return cls(**data)       # checks 0 < beta_start < beta_end < 1
        except (TypeError, ValueError, VditError) as e:
            v.fail(where, f"invalid schedule: {e}")

    @property
    def betas(self) -> np.ndarray:
        T = self.num_timesteps
        if self.kind != "cosine":
            if self.beta_start is None:
                # Ho et al. 2020: 1e-4 .. 0.02 over T=1000; scaled so other T keep the same end points' product.
                start, end = 1e-4 * 1000.0 / T, 0.02 * 1000.0 / T
            else:
                start, end = self.beta_start, self.beta_end
            if self.kind == "linear":
                return np.linspace(start, end, T, dtype=np.float64)
            # scaled_linear (latent diffusion): linear in sqrt(beta)
            return np.linspace(math.sqrt(start), math.sqrt(end), T, dtype=np.float64) ** 2
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
        ends = {} if self.beta_start is None else {"beta_start": self.beta_start, "beta_end": self.beta_end}
        return {"kind": self.kind, "num_timesteps": self.num_timesteps, **ends}


# ---- the timesteps a sampler visits -----------------------------------------------------------
def timestep_subset(num_timesteps: int, steps: int) -> np.ndarray:
    """Evenly spaced, descending timesteps for a respaced sampler (DDIM's "uniform" skip)."""
    check_steps(num_timesteps, steps)
    ts = np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int64)
    return ts[::-1].copy()


def check_steps(num_timesteps: int, steps: int) -> None:
    if not 1 <= steps <= num_timesteps:
        raise VditError(f"steps must be between 1 and {num_timesteps}, got {steps}")


def solver_timesteps(schedule: Schedule, steps: int, spacing: str = "linspace",
                     lambda_min: float = -math.inf) -> np.ndarray:
    """Descending timesteps of a multistep solver, as diffusers spaces them (Lin et al. 2023, table 2)
    over the timesteps whose log(alpha/sigma) is >= lambda_min; the solver then goes from the last one
    to the clean video. linspace and leading leave t=0 out."""
    T = schedule.num_timesteps
    check_steps(T, steps)
    ab = schedule.alphas_cumprod
    top = T - int(np.sum(0.5 * np.log(ab / (1 - ab)) < lambda_min))    # diffusers' last_timestep
    if spacing == "linspace":
        ts = np.linspace(0, top - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(0, steps + 1) * (top // (steps + 1))).round()[::-1][:-1]
    elif spacing == "trailing":
        ts = np.arange(top, 0, -T / steps).round() - 1
    else:
        raise VditError(f"timestep spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    ts = ts.astype(np.int64)
    if len(ts) != steps or np.any(np.diff(ts) >= 0) or ts[-1] < 0:
        raise VditError(f"{steps} steps with {spacing} spacing repeat timesteps of T={T} (from t={top - 1}); "
                        "use fewer steps")
    return ts
