"""Noise schedules in numpy (no torch): betas and alpha_bar of a DDPM-family schedule, q(x_t|x_0) and the
posterior, the timesteps a sampler visits. Flow matching's schedules live in flow.py, the reading of a
diffusers scheduler_config.json in scheduler_config.py, what a sampler does at each step in samplers.py."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vdit_deploy import validate as v
from vdit_deploy.errors import VditError

SCHEDULES = ("linear", "scaled_linear", "cosine")
VARIANCES = ("fixed", "learned_range")    # the model's variance: the posterior's, or learned in 2C channels

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
    zero_snr: bool = False         # rescale_betas_zero_snr: alpha_bar rescaled to end at 0 (Lin et al. 2024)
    snr_shift: float = 1.0         # CogVideoX's snr_shift_scale: alpha_bar / (s + (1 - s) alpha_bar)
    clip: float | None = 1.0       # the x0 prediction is clipped to [-clip, clip]; None: not clipped
    # the pipeline's sampler, step count and timestep spacing (a scheduler config's); None: the project's
    sampler: str | None = None
    steps: int | None = None
    spacing: str | None = None
    order: int | None = None
    lambda_min: float | None = LAMBDA_MIN   # where the solvers start (None: all of T, as diffusers' UniPC)

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise VditError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")
        if self.num_timesteps < 2:
            raise VditError(f"num_timesteps must be >= 2, got {self.num_timesteps}")
        if not (isinstance(self.snr_shift, (int, float)) and self.snr_shift > 0):
            raise VditError(f"snr_shift must be > 0, got {self.snr_shift}")
        if self.clip is not None and not (isinstance(self.clip, (int, float)) and self.clip > 0):
            raise VditError(f"clip must be > 0 (or None: no clipping), got {self.clip}")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise VditError(f"timestep spacing must be one of {', '.join(SPACINGS)}, got {self.spacing!r}")
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
    def from_dict(cls, data, where: str = "") -> "Schedule":
        """A Schedule from its JSON dict (to_dict's), checked as untrusted input."""
        v.obj(data, "schedule", required=("kind",), where=where, extra_ok=True)
        if data["kind"] == "flow":
            from vdit_deploy.flow import FlowSchedule

            return FlowSchedule.from_dict(data, where)
        v.obj(data, "schedule", required=("kind", "num_timesteps"), where=where, extra_ok=True)
        v.string(data["kind"], "schedule kind", (*SCHEDULES, "flow"), where)
        v.integer(data["num_timesteps"], "num_timesteps", 2, 100_000, where)
        for name in ("beta_start", "beta_end"):       # optional; absent in exports from before them
            if data.get(name) is not None:
                v.number(data[name], name, 0, 1, lo_open=True, where=where)
        if data.get("clip", 1.0) is not None:
            v.number(data.get("clip", 1.0), "clip", 0, lo_open=True, where=where)
        if "zero_snr" in data:
            v.boolean(data["zero_snr"], "zero_snr", where)
        if "snr_shift" in data:
            v.number(data["snr_shift"], "snr_shift", 0, lo_open=True, where=where)
        for name in ("sampler", "spacing"):
            if data.get(name) is not None:
                v.string(data[name], name, where=where)
        if data.get("steps") is not None:
            v.integer(data["steps"], "steps", 1, 100_000, where)
        if data.get("order") is not None:
            v.integer(data["order"], "order", 1, 2, where)
        if data.get("lambda_min") is not None:
            v.number(data["lambda_min"], "lambda_min", where=where)
        try:
            return cls(**data)       # checks 0 < beta_start < beta_end < 1
        except (TypeError, ValueError, VditError) as e:
            v.fail(where, f"invalid schedule: {e}")

    @property
    def betas(self) -> np.ndarray:
        if self.zero_snr or self.snr_shift != 1.0:    # from the rescaled alpha_bar
            ab = self.alphas_cumprod
            return 1 - ab / np.append(1.0, ab[:-1])
        return self._betas()

    def _betas(self) -> np.ndarray:
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
        ab = np.cumprod(1.0 - self._betas())
        if self.snr_shift != 1.0:     # SNR divided by snr_shift (CogVideoX)
            ab = ab / (self.snr_shift + (1 - self.snr_shift) * ab)
        if self.zero_snr:             # sqrt(alpha_bar) shifted to 0 at T, scaled to keep its value at t = 0
            root = np.sqrt(ab)
            root = (root - root[-1]) * root[0] / (root[0] - root[-1])
            ab = root ** 2
        return ab

    def alpha_bar(self, t) -> np.ndarray:
        """alpha_bar_t, with alpha_bar at t = -1 equal to 1 (the clean video)."""
        t = np.rint(np.asarray(t)).astype(np.int64)     # a Step's t is a float holding the integer timestep
        return np.where(t >= 0, self.alphas_cumprod[np.maximum(t, 0)], 1.0)

    def q_sample(self, x0: np.ndarray, t, noise: np.ndarray) -> np.ndarray:
        """x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I); t broadcasts over the batch axis."""
        ab = self.alpha_bar(t).reshape(-1, *([1] * (x0.ndim - 1)))
        return (np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise).astype(x0.dtype)

    def posterior(self, t: int) -> tuple[float, float, float]:
        """q(x_{t-1} | x_t, x_0) = N(c0 x_0 + ct x_t, var): returns (c0, ct, var)."""
        t = int(round(t))
        beta, ab, ab_prev = self.betas[t], self.alpha_bar(t), self.alpha_bar(t - 1)
        c0 = beta * math.sqrt(ab_prev) / (1 - ab)
        ct = (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)
        var = beta * (1 - ab_prev) / (1 - ab)
        return float(c0), float(ct), float(var)

    def to_dict(self) -> dict:
        """Only what differs from the defaults, so older exports' schedules read back equal."""
        ends = {} if self.beta_start is None else {"beta_start": self.beta_start, "beta_end": self.beta_end}
        extra = {k: getattr(self, k) for k, d in (("zero_snr", False), ("snr_shift", 1.0), ("clip", 1.0),
                                                  ("sampler", None), ("steps", None), ("spacing", None),
                                                  ("order", None), ("lambda_min", LAMBDA_MIN))
                 if getattr(self, k) != d}
        return {"kind": self.kind, "num_timesteps": self.num_timesteps, **ends, **extra}

    def describe(self) -> str:
        ends = "" if self.beta_start is None else f" {self.beta_start:g}..{self.beta_end:g}"
        extra = [x for x in (self.zero_snr and "zero terminal SNR", self.snr_shift != 1 and f"SNR shift {self.snr_shift:g}",
                             f"x0 clipped to +-{self.clip:g}" if self.clip is not None else "x0 not clipped") if x]
        return f"DDPM {self.kind}{ends} betas over T={self.num_timesteps}, " + ", ".join(extra)


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
