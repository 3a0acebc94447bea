"""Flow matching (rectified flow) schedules in numpy (no torch): x_t = (1 - sigma) x0 + sigma noise, the
model predicts the velocity v = noise - x0 and is fed t = sigma * num_timesteps (a float), as diffusers'
FlowMatchEulerDiscreteScheduler and the flow modes of UniPC and DPM-Solver++ write it. Mochi trains the
other way round (invert: the model is fed (1 - sigma) * num_timesteps and gives x0 - noise).

A FlowSchedule holds what changes the sigmas a sampler visits: the shift (static, or dynamic from the
token count: use_dynamic_shifting's mu), shift_terminal, karras / exponential / beta sigmas, and the base
sigmas a pipeline passes in (LTX, Hunyuan and Mochi pass their own, Wan lets the scheduler space them).
Each diffusers scheduler spaces them its own way, so there is one grid function per scheduler here, each
copying that scheduler's set_timesteps (float32 where diffusers is float32); the samplers' coefficients
live in flow_samplers.py.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from vdit_deploy import validate as v
from vdit_deploy.errors import VditError

TIME_SHIFTS = ("exponential", "linear")
SIGMA_KINDS = ("", "karras", "exponential", "beta")
# the sigmas a pipeline hands the scheduler before shifting: "default" lets the scheduler space them
# (Wan, UniPC), "linear" is np.linspace(1, 1/n, n) (LTX-Video, Flux), "linear_zero" np.linspace(1, 0,
# n + 1)[:-1] (HunyuanVideo), "linear_quadratic" Mochi's (genmo's linear_quadratic_schedule, 0.025)
BASE_SIGMAS = ("default", "linear", "linear_zero", "linear_quadratic")
FLOW_SAMPLERS = ("euler", "unipc", "dpm++")


@dataclass(frozen=True)
class FlowSchedule:
    num_timesteps: int = 1000
    shift: float = 1.0
    dynamic_shift: bool = False       # use_dynamic_shifting: the shift comes from mu (the token count)
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    seq_len: int | None = None        # the tokens the denoiser sees (what mu is computed from)
    time_shift: str = "exponential"   # time_shift_type of the dynamic shift
    shift_terminal: float | None = None
    invert: bool = False              # invert_sigmas (Mochi)
    sigmas: str = ""                  # karras / exponential / beta re-spacing, "" for none
    base_sigmas: str = "default"      # BASE_SIGMAS
    stochastic: bool = False          # FlowMatchEuler's stochastic_sampling: re-noise x0 at each step
    sampler: str = "euler"            # the pipeline's sampler, step count and solver order (its defaults)
    steps: int = 50
    order: int = 2

    kind = "flow"

    def __post_init__(self):
        where = "flow schedule"
        v.integer(self.num_timesteps, "num_train_timesteps", 2, 100_000, where)
        v.number(self.shift, "shift", 0, lo_open=True, where=where)
        for name in ("base_shift", "max_shift"):
            v.number(getattr(self, name), name, where=where)
        v.integer(self.base_seq_len, "base_image_seq_len", 1, where=where)
        v.integer(self.max_seq_len, "max_image_seq_len", 1, where=where)
        if self.max_seq_len == self.base_seq_len and self.dynamic_shift:
            raise VditError("flow schedule: max_image_seq_len must differ from base_image_seq_len")
        v.string(self.time_shift, "time_shift_type", TIME_SHIFTS, where)
        if self.shift_terminal is not None:
            if v.number(self.shift_terminal, "shift_terminal", 0, 1, lo_open=True, where=where) == 1:
                raise VditError("flow schedule: shift_terminal must be below 1")
        v.string(self.sigmas, "sigma spacing", SIGMA_KINDS, where)
        v.string(self.base_sigmas, "base sigmas", BASE_SIGMAS, where)
        v.string(self.sampler, "sampler", FLOW_SAMPLERS, where)
        v.integer(self.steps, "steps", 1, 100_000, where)
        v.integer(self.order, "solver_order", 1, 2, where)
        if self.dynamic_shift:
            if self.seq_len is None:
                raise VditError("flow schedule: use_dynamic_shifting needs the token count (seq_len) the shift "
                                "comes from")
            v.integer(self.seq_len, "seq_len", 1, where=where)
            if self.time_shift == "linear" and self.mu <= 0:
                raise VditError(f"flow schedule: a linear time shift needs mu > 0, got {self.mu:.4g}")
        if self.sigmas == "beta":
            try:
                import scipy.stats  # noqa: F401
            except ImportError:
                raise VditError("beta sigmas need scipy (pip install scipy)") from None

    # ---- what mu and the shift are ---------------------------------------------------------------
    @property
    def mu(self) -> float:
        """diffusers' calculate_shift: mu linear in the token count between (base_seq_len, base_shift)
        and (max_seq_len, max_shift)."""
        m = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return self.seq_len * m + (self.base_shift - m * self.base_seq_len)

    def shifted(self, s: np.ndarray) -> np.ndarray:
        """The shift of sigmas s in (0, 1]: static shift s / (1 + (shift - 1) s), or the dynamic one from mu."""
        if self.dynamic_shift:
            with np.errstate(divide="ignore"):
                e = (1 / s - 1) ** 1.0
            scale = math.exp(self.mu) if self.time_shift == "exponential" else self.mu
            return scale / (scale + e)
        return self.shift * s / (1 + (self.shift - 1) * s)

    def terminal(self, s: np.ndarray) -> np.ndarray:
        """shift_terminal: stretch the shifted sigmas so the last equals shift_terminal (LTX-Video)."""
        if not self.shift_terminal:
            return s
        one_minus = 1 - s
        return 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))

    def base(self, steps: int) -> np.ndarray | None:
        """The pipeline's own sigmas before shifting (None: the scheduler spaces them)."""
        if self.base_sigmas == "linear":
            return np.linspace(1.0, 1 / steps, steps)
        if self.base_sigmas == "linear_zero":
            return np.linspace(1.0, 0.0, steps + 1)[:-1]
        if self.base_sigmas == "linear_quadratic":
            return np.array(linear_quadratic(steps, 0.025))
        return None

    def respaced(self, s: np.ndarray, steps: int) -> np.ndarray:
        """Karras (rho 7), exponential or beta (0.6, 0.6) sigmas between the first and last of s."""
        lo, hi = float(s[-1]), float(s[0])
        if self.sigmas == "karras":
            ramp = np.linspace(0, 1, steps)
            return (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
        if self.sigmas == "exponential":
            return np.exp(np.linspace(math.log(hi), math.log(lo), steps))
        if self.sigmas == "beta":
            import scipy.stats
            return np.array([lo + scipy.stats.beta.ppf(p, 0.6, 0.6) * (hi - lo) for p in 1 - np.linspace(0, 1, steps)])
        return s

    # ---- the grids each diffusers scheduler builds --------------------------------------------------
    def euler_grid(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """FlowMatchEulerDiscreteScheduler.set_timesteps: (timesteps (n,) float32, sigmas (n + 1,) float32),
        the last sigma 0 (1 when inverted). Its end points come from __init__'s float32 training sigmas,
        already shifted once when the shift is static (diffusers then shifts the spacing again)."""
        check_steps(steps)
        T = self.num_timesteps
        s = self.base(steps)
        if s is None:
            train = np.linspace(1, T, T, dtype=np.float32)[::-1] / np.float32(T)
            if not self.dynamic_shift:
                train = (np.float32(self.shift) * train / (1 + np.float32(self.shift - 1) * train)).astype(np.float32)
            s = np.linspace(float(train[0]) * T, float(train[-1]) * T, steps) / T
        s = self.respaced(self.terminal(self.shifted(np.asarray(s, np.float64))), steps).astype(np.float32)
        if self.invert:
            s = (1 - s).astype(np.float32)
        ts = (s * np.float32(T)).astype(np.float32)
        return ts, np.append(s, np.float32(1.0 if self.invert else 0.0)).astype(np.float32)

    def unipc_grid(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """UniPCMultistepScheduler.set_timesteps with use_flow_sigmas: (timesteps (n,) int64, as diffusers
        truncates sigma * T, sigmas (n + 1,) float32 ending at 0)."""
        check_steps(steps)
        s = self.base(steps)
        if s is None:
            s = np.linspace(1, 1 / self.num_timesteps, steps + 1)[:-1]
        s = self.terminal(self.shifted(np.asarray(s, np.float64)))
        if abs(s[0] - 1) < 1e-6:      # diffusers: keeps log(alpha) finite at the first steps
            s[0] -= 1e-6
        ts = (s * self.num_timesteps).astype(np.int64)
        return ts, np.append(s, 0.0).astype(np.float32)

    def dpm_grid(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """DPMSolverMultistepScheduler.set_timesteps with use_flow_sigmas: shift(linspace(0, 1 - 1/T, n + 1))
        from the top, the 0 at the end; timesteps truncated to int64. A dynamic shift is exp(mu)."""
        check_steps(steps)
        shift = math.exp(self.mu) if self.dynamic_shift else self.shift
        s = 1.0 - np.linspace(1, 1 / self.num_timesteps, steps + 1)
        s = np.flip(shift * s / (1 + (shift - 1) * s))[:-1].copy()
        return (s * self.num_timesteps).astype(np.int64), np.append(s, 0.0).astype(np.float32)

    def grid(self, sampler: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
        return {"euler": self.euler_grid, "unipc": self.unipc_grid, "dpm++": self.dpm_grid}[sampler](steps)

    def q_sample(self, x0: np.ndarray, sigma, noise: np.ndarray) -> np.ndarray:
        """x_sigma = (1 - sigma) x0 + sigma noise; sigma broadcasts over the batch axis."""
        s = np.asarray(sigma, np.float64).reshape(-1, *([1] * (x0.ndim - 1)))
        return ((1 - s) * x0 + s * noise).astype(x0.dtype)

    # ---- stored form ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"kind": "flow", **asdict(self)}

    @classmethod
    def from_dict(cls, data, where: str = "") -> "FlowSchedule":
        v.obj(data, "flow schedule", required=("kind",), optional=tuple(cls.__dataclass_fields__), where=where)
        fields = {k: x for k, x in data.items() if k != "kind"}
        try:
            return cls(**fields)
        except (TypeError, ValueError, VditError) as e:
            v.fail(where, f"invalid flow schedule: {e}")

    def describe(self) -> str:
        shift = (f"dynamic shift from {self.seq_len} tokens (mu {self.mu:.4g}, {self.time_shift})" if self.dynamic_shift
                 else f"shift {self.shift:g}")
        extra = [x for x in (self.sigmas and f"{self.sigmas} sigmas",
                             self.shift_terminal and f"shift_terminal {self.shift_terminal:g}",
                             self.invert and "inverted sigmas (t = (1 - sigma) T)",
                             self.base_sigmas != "default" and f"{self.base_sigmas} base sigmas",
                             self.stochastic and "stochastic sampling") if x]
        return (f"flow matching (x_t = (1 - sigma) x0 + sigma noise, t = sigma x {self.num_timesteps}), "
                + ", ".join([shift, *extra]))


def check_steps(steps: int) -> None:
    if not (isinstance(steps, int) and 1 <= steps <= 100_000):
        raise VditError(f"steps must be between 1 and 100000, got {steps}")


def linear_quadratic(steps: int, threshold_noise: float, linear_steps: int | None = None) -> list[float]:
    """Mochi's sigmas (diffusers' pipeline_mochi.linear_quadratic_schedule): linear to threshold_noise over
    the first half, quadratic after; returned as 1 - x, descending from 1."""
    linear_steps = steps // 2 if linear_steps is None else linear_steps
    lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    diff = linear_steps - threshold_noise * steps
    quad_steps = steps - linear_steps
    quad_coef = diff / (linear_steps * quad_steps ** 2)
    lin_coef = threshold_noise / linear_steps - 2 * diff / quad_steps ** 2
    const = quad_coef * linear_steps ** 2
    quad = [quad_coef * i ** 2 + lin_coef * i + const for i in range(linear_steps, steps)]
    return [1.0 - x for x in lin + quad]
