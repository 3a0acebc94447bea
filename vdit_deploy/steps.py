"""The one update every runtime applies (numpy here, no torch): a sampler is a plan of these steps
(samplers.py for DDPM-family schedules, flow_samplers.py for flow matching).

Every sampler step is written as the same affine update of the model output `out` (eps, v, x0 or a
flow model's velocity: for flow a = 1, b = sigma, since x0 = x_t - sigma v)

    x0_hat  = clip(a * x_t - b * out, -clip, +clip)   # the data prediction
    eps_hat = (a * x_t - x0_hat) / b          # out consistent with the clipped x0 (= out if no clipping)
    x_prev  = c_x0 * x0_hat + c_xt * x_t + c_eps * eps_hat + c_x0_prev * x0_prev + c_corr * corr + std * z
    std     = sigma + learned_var * exp(0.5 * (log_var_min + frac * (log_var_max - log_var_min)))

where frac = (out_var + 1) / 2 comes from a learned-sigma model's second C output channels (Nichol &
Dhariwal 2021's learned range, as DiT and Latte train it: the log variance interpolates between the
posterior's and beta_t's); learned_var is 0 for every other step, so the update reads only out's first C.

plus, for the multistep solvers, the state the next step reads (SolverState):

    x0_prev' = x0_hat                         # DPM-Solver++ and UniPC extrapolate from the last x0
    corr'    = d_x0 * x0_hat + d_xt * x_t + d_x0_prev * x0_prev + d_corr * corr

(UniPC's corrector: the corrected sample at the next step is corr' + k * x0_hat', so corr' is the part
of it known before the next model call), so that any runtime (numpy, an ONNX graph, a TensorRT engine)
implements one formula, keeps x_t, x0_prev and corr on the device, and the host only feeds the step's
scalars. DDPM, DDIM and flow Euler have zero state coefficients. The losses live with training.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vdit_deploy.errors import VditError

COEF_NAMES = ("a", "b", "clip", "c_x0", "c_xt", "c_eps", "sigma",            # every step graph
              "c_x0_prev", "c_corr", "d_x0", "d_xt", "d_x0_prev", "d_corr",  # multistep solvers' state
              "log_var_min", "log_var_max", "learned_var")                   # DDPM with learned variance
SINGLE_STEP_COEFS = 7      # step graphs exported before the multistep solvers take only the first 7
MULTISTEP_COEFS = 13       # step graphs exported before learned variance take only the first 13

@dataclass(frozen=True)
class Step:
    t: int | float     # the timestep fed to the denoiser (as float32): an int on DDPM schedules, sigma * T for flow
    coefs: np.ndarray  # float32 (16,) in COEF_NAMES order
    multistep: bool = False   # reads or writes the solver state (x0_prev, corr)

    @property
    def sigma(self) -> float:
        """The fixed part of the noise's std (a learned variance adds to it: see stochastic)."""
        return float(self.coefs[6])

    @property
    def stochastic(self) -> bool:
        """Whether the step adds noise z (fixed sigma or learned variance): the sampler draws it only then."""
        return self.sigma > 0 or float(self.coefs[MULTISTEP_COEFS + 2]) > 0


@dataclass
class SolverState:
    """What a multistep solver carries from one step to the next: the previous data prediction and
    UniPC's corrector part. None before the first step (read as zeros). A runtime may keep device
    handles here; the step that reads them replaces them with its outputs."""
    x0_prev: object = None
    corr: object = None


def coefs(a, b, clip, c_x0=0.0, c_xt=0.0, c_eps=0.0, sigma=0.0, c_x0_prev=0.0, c_corr=0.0,
           d_x0=0.0, d_xt=0.0, d_x0_prev=0.0, d_corr=0.0, log_var_min=0.0, log_var_max=0.0,
           learned_var=0.0) -> np.ndarray:
    clip = np.inf if clip is None else clip     # no clipping: the step graph's Min/Max with +-inf
    return np.array([a, b, clip, c_x0, c_xt, c_eps, sigma, c_x0_prev, c_corr, d_x0, d_xt, d_x0_prev, d_corr,
                     log_var_min, log_var_max, learned_var], np.float32)


def apply_step(x_t: np.ndarray, out: np.ndarray, coefs: np.ndarray, noise: np.ndarray | None,
               state: SolverState | None = None) -> np.ndarray:
    """The affine update above, in float32 (what every runtime computes). `out` is the model output;
    a learned-sigma model's 2C channels hold eps/v/x0 first, the variance after: the update uses the
    first C, a learned-variance step both. `state`, when given, is read and replaced by this step's
    (x0_hat, corr'). `coefs` may be a prefix of COEF_NAMES (7 or 13, as older step graphs take)."""
    c = np.asarray(coefs, np.float32)
    a, b, clip, c_x0, c_xt, c_eps, sigma = c[:SINGLE_STEP_COEFS]
    channels = x_t.shape[1]
    std = sigma
    if len(c) > MULTISTEP_COEFS and c[MULTISTEP_COEFS + 2] > 0:
        log_var_min, log_var_max, learned_var = c[MULTISTEP_COEFS:]
        if out.shape[1] != 2 * channels:
            raise VditError(f"this step uses a learned variance, but the model output has {out.shape[1]} channels, "
                            f"not 2 x {channels} (eps and variance)")
        frac = (out[:, channels:] + 1) / 2                                       # model's v in [-1, 1] -> [0, 1]
        std = sigma + learned_var * np.exp(0.5 * (log_var_min + frac * (log_var_max - log_var_min)))
    out = out[:, :channels]
    ax = a * x_t
    x0 = np.clip(ax - b * out, -clip, clip)
    eps_hat = (ax - x0) / b     # re-derived as in guided-diffusion: keeps DDIM(eta=1) == DDPM with clipping
    x_prev = c_x0 * x0 + c_xt * x_t + c_eps * eps_hat
    if len(c) > SINGLE_STEP_COEFS and state is None and c[SINGLE_STEP_COEFS:SINGLE_STEP_COEFS + 2].any():
        raise VditError("this multistep solver step reads the previous ones' SolverState: pass it (sampling.sample does)")
    if len(c) > SINGLE_STEP_COEFS and state is not None:
        c_x0_prev, c_corr, d_x0, d_xt, d_x0_prev, d_corr = c[SINGLE_STEP_COEFS:MULTISTEP_COEFS]
        zeros = np.zeros_like(x_t)
        x0_prev = zeros if state.x0_prev is None else np.asarray(state.x0_prev, np.float32)
        corr = zeros if state.corr is None else np.asarray(state.corr, np.float32)
        x_prev = x_prev + c_x0_prev * x0_prev + c_corr * corr
        state.x0_prev, state.corr = x0.astype(np.float32), (d_x0 * x0 + d_xt * x_t + d_x0_prev * x0_prev
                                                             + d_corr * corr).astype(np.float32)
    if np.any(std > 0):
        if noise is None:
            raise VditError("this step adds noise: pass it (sampling.sample draws it where Step.stochastic)")
        x_prev = x_prev + std * noise
    return x_prev.astype(np.float32)


def guide(out_cond: np.ndarray, out_null: np.ndarray, scale: float, channels: int | None = None) -> np.ndarray:
    """Classifier-free guidance (Ho & Salimans): null + s (cond - null) on the prediction's `channels`;
    a learned variance after them comes from the conditional pass (as DiT does)."""
    c = out_cond.shape[1] if channels is None else channels
    pred = out_null[:, :c] + np.float32(scale) * (out_cond[:, :c] - out_null[:, :c])
    return np.concatenate([pred, out_cond[:, c:]], 1) if out_cond.shape[1] > c else pred


def guided_step(denoise, x_t: np.ndarray, t: int, cond: dict, null: dict | None, guidance: float,
                coefs: np.ndarray, noise: np.ndarray | None, state: SolverState | None = None) -> np.ndarray:
    """One sampler step driven by any `denoise(x_t, t, cond) -> out` on numpy arrays (cond: name -> array,
    batch first). With guidance != 1 the conditional and null passes (null: cond's null conditioning,
    same batch) run as one batch of 2B."""
    b = x_t.shape[0]
    if guidance == 1.0:
        out = denoise(x_t, np.full(b, t, np.float32), cond)
    else:
        if null is None:
            raise VditError("classifier-free guidance needs the null conditioning (guidance 1 runs without)")
        both = denoise(np.concatenate([x_t, x_t]), np.full(2 * b, t, np.float32),
                       {k: np.concatenate([cond[k], null[k]]) for k in cond})
        out = guide(both[:b], both[b:], guidance, x_t.shape[1])
    return apply_step(x_t, out, coefs, noise, state)
