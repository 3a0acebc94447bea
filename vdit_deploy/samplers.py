"""The samplers in numpy (no torch): DDPM, DDIM, DPM-Solver++ (2M) and UniPC (bh2) as plans of coefficients,
and the one update every runtime applies. Schedules and timestep spacing live in schedules.py.

Every sampler step is written as the same affine update of the model output `out` (eps, v or x0)

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
scalars. DDPM and DDIM have zero state coefficients. The eps-prediction MSE loss lives with training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.schedules import LAMBDA_MIN, Schedule, solver_timesteps, timestep_subset


# ---- samplers as sequences of affine steps ---------------------------------------------------
COEF_NAMES = ("a", "b", "clip", "c_x0", "c_xt", "c_eps", "sigma",            # every step graph
              "c_x0_prev", "c_corr", "d_x0", "d_xt", "d_x0_prev", "d_corr",  # multistep solvers' state
              "log_var_min", "log_var_max", "learned_var")                   # DDPM with learned variance
SINGLE_STEP_COEFS = 7      # step graphs exported before the multistep solvers take only the first 7
MULTISTEP_COEFS = 13       # step graphs exported before learned variance take only the first 13
SAMPLERS = ("ddpm", "ddim", "dpm++", "unipc")
MULTISTEP_ORDERS = {"dpm++": (1, 2), "unipc": (1, 2)}
PREDICTIONS = ("eps", "v", "x0")
# From the quality-per-step table (README): UniPC at 15 steps and DPM-Solver++ at 20 come as close to
# 250-step DDIM as DDIM at 50 does.
DEFAULT_SAMPLER = "unipc"
DEFAULT_STEPS = {"ddim": 50, "dpm++": 20, "unipc": 15}


@dataclass(frozen=True)
class Step:
    t: int            # the timestep fed to the denoiser
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


def _coefs(a, b, clip, c_x0=0.0, c_xt=0.0, c_eps=0.0, sigma=0.0, c_x0_prev=0.0, c_corr=0.0,
           d_x0=0.0, d_xt=0.0, d_x0_prev=0.0, d_corr=0.0, log_var_min=0.0, log_var_max=0.0,
           learned_var=0.0) -> np.ndarray:
    return np.array([a, b, clip, c_x0, c_xt, c_eps, sigma, c_x0_prev, c_corr, d_x0, d_xt, d_x0_prev, d_corr,
                     log_var_min, log_var_max, learned_var], np.float32)


def _prediction_coefs(schedule: Schedule, t: int, prediction: str) -> tuple[float, float]:
    """(a, b) with x0 = a * x_t - b * out, for a model predicting eps, v (Salimans & Ho 2022) or x0."""
    ab = float(schedule.alpha_bar(t))
    if prediction == "eps":
        return 1.0 / math.sqrt(ab), math.sqrt(1.0 / ab - 1.0)
    if prediction == "v":
        return math.sqrt(ab), math.sqrt(1.0 - ab)
    if prediction == "x0":
        return 0.0, -1.0
    raise VditError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")


def _ddim_coefs(schedule: Schedule, t: int, prediction: str, clip: float, c_x0: float, c_xt: float,
                c_eps: float, sigma: float, **learned) -> np.ndarray:
    """DDPM/DDIM coefficients written for eps; for a v or x0 model the eps term becomes x0 and x_t terms,
    eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab), since eps_hat would be v or x0 there."""
    a, b = _prediction_coefs(schedule, t, prediction)
    if prediction != "eps" and c_eps:
        ab = float(schedule.alpha_bar(t))
        c_x0, c_xt, c_eps = c_x0 - c_eps * math.sqrt(ab / (1 - ab)), c_xt + c_eps / math.sqrt(1 - ab), 0.0
    return _coefs(a, b, clip, c_x0, c_xt, c_eps, sigma, **learned)


def ddpm_steps(schedule: Schedule, clip: float = 1.0, prediction: str = "eps",
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
        out.append(Step(t, _ddim_coefs(schedule, t, prediction, clip, c0, ct, 0.0, **noise)))
    return out


def ddim_steps(schedule: Schedule, steps: int, eta: float = 0.0, clip: float = 1.0,
               prediction: str = "eps") -> list[Step]:
    """DDIM (Song et al. 2021) over a respaced subset; eta=0 is deterministic, eta=1 is DDPM-like."""
    if eta < 0:
        raise VditError(f"eta must be >= 0, got {eta}")
    ts = timestep_subset(schedule.num_timesteps, steps)
    out = []
    for i, t in enumerate(ts):
        t_prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
        ab, ab_prev = float(schedule.alpha_bar(t)), float(schedule.alpha_bar(t_prev))
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
        c_eps = math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0))
        out.append(Step(int(t), _ddim_coefs(schedule, int(t), prediction, clip, math.sqrt(ab_prev), 0.0, c_eps, sigma)))
    return out


# ---- multistep ODE solvers in data prediction (x0) form ------------------------------------------
# alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t), lambda_t = log(alpha_t / sigma_t); the last step goes to
# the clean video (alpha 1, sigma 0, lambda +inf), as DDIM does and diffusers' final_sigmas_type="zero".
# With h = lambda_next - lambda_now both solvers need exp(-h) = (sigma_next / alpha_next) / (sigma_now /
# alpha_now), which is 0 at the clean end, and lambda differences of earlier steps, which are finite.

def _check_order(sampler: str, order: int) -> None:
    if order not in MULTISTEP_ORDERS[sampler]:
        have = " and ".join(map(str, MULTISTEP_ORDERS[sampler]))
        raise VditError(f"{sampler} has orders {have}, got {order}")


def _solver_grid(schedule: Schedule, steps: int, spacing: str, lambda_min: float):
    """Timesteps and per-point (alpha, sigma, lambda) with the clean end appended (lambda = inf)."""
    ts = solver_timesteps(schedule, steps, spacing, lambda_min)
    ab = schedule.alpha_bar(ts).astype(np.float64)
    alpha = np.append(np.sqrt(ab), 1.0)
    sigma = np.append(np.sqrt(1 - ab), 0.0)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    return ts, alpha, sigma, lam


def dpm_solver_steps(schedule: Schedule, steps: int = 20, order: int = 2, spacing: str = "linspace",
                     prediction: str = "eps", clip: float = 1.0, lambda_min: float = LAMBDA_MIN) -> list[Step]:
    """DPM-Solver++(2M) (Lu et al. 2022, midpoint form as in diffusers): first order at the first step
    and at the last one (to sigma 0, where the second-order term is undefined), second order between:

        x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) (x0 + (x0 - x0_prev) / (2 r)),
        r = (lambda - lambda_prev) / h."""
    _check_order("dpm++", order)
    ts, alpha, sigma, lam = _solver_grid(schedule, steps, spacing, lambda_min)
    out = []
    for i, t in enumerate(ts):
        a, b = _prediction_coefs(schedule, int(t), prediction)
        exp_neg_h = (sigma[i + 1] / alpha[i + 1]) / (sigma[i] / alpha[i])
        c_x0 = -alpha[i + 1] * (exp_neg_h - 1.0)               # first order: DDIM in x0 form
        c_x0_prev = 0.0
        if order == 2 and 0 < i < len(ts) - 1:
            r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
            c_x0, c_x0_prev = c_x0 * (1 + 0.5 / r), -c_x0 * 0.5 / r
        out.append(Step(int(t), _coefs(a, b, clip, c_x0=c_x0, c_xt=sigma[i + 1] / sigma[i], c_x0_prev=c_x0_prev),
                        multistep=True))
    return out


def _unipc_terms(alpha, sigma, lam, i: int, order: int) -> tuple[float, float, float, float, float]:
    """UniPC-bh2 (Zhao et al. 2023) from point i to i+1 with x0 = m_i, x0_prev = m_{i-1}:
        predictor  x_{i+1}   = A x_i + P0 m_i + P1 m_{i-1}
        corrector  x_{i+1}^c = A x_i + C0 m_i + C1 m_{i-1} + K m_{i+1}    (run once m_{i+1} is known)
    Returns (A, P0, P1, C0, C1, K); order 1 has P1 = C1 = 0."""
    A = sigma[i + 1] / sigma[i]
    h_phi_1 = (sigma[i + 1] / alpha[i + 1]) / (sigma[i] / alpha[i]) - 1.0    # expm1(-h)
    base = -alpha[i + 1] * h_phi_1                                           # the first-order x0 term
    B_h = h_phi_1                                                            # bh2
    if order == 1:
        return A, base, 0.0, base + alpha[i + 1] * B_h * 0.5, 0.0, -alpha[i + 1] * B_h * 0.5
    hh = -(lam[i + 1] - lam[i])
    rk = (lam[i - 1] - lam[i]) / (lam[i + 1] - lam[i])
    h_phi_k = h_phi_1 / hh - 1.0                                             # b_k as in diffusers
    rhs = np.array([h_phi_k / B_h, (h_phi_k / hh - 0.5) * 2.0 / B_h])
    rho_c = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), rhs)         # corrector weights
    # the D1 = (m_{i-1} - m_i) / rk terms: predictor weight 1/2, corrector rho_c[0]
    p = alpha[i + 1] * B_h * 0.5 / rk
    c = alpha[i + 1] * B_h * rho_c[0] / rk
    K = -alpha[i + 1] * B_h * rho_c[1]
    return A, base + p, -p, base + c - K, -c, K


def unipc_steps(schedule: Schedule, steps: int = 20, order: int = 2, spacing: str = "linspace",
                prediction: str = "eps", clip: float = 1.0, lambda_min: float = LAMBDA_MIN) -> list[Step]:
    """UniPC with the bh2 predictor and corrector (diffusers' UniPCMultistepScheduler, predict_x0).
    At step i the model sees the predicted x_i; the corrected x_i = corr + K_i x0 (x_0 itself at i = 0)
    feeds the predictor of x_{i+1} and, through corr', the corrector at step i+1. Orders follow diffusers:
    1 at the first and the last step (lower_order_final), `order` between; each corrector has the order
    of the predictor before it. The last predictor's output is the sample (no corrector after it)."""
    _check_order("unipc", order)
    ts, alpha, sigma, lam = _solver_grid(schedule, steps, spacing, lambda_min)
    n = len(ts)
    orders = [min(order, n - i, i + 1) for i in range(n)]
    out, K = [], 0.0
    for i, t in enumerate(ts):
        a, b = _prediction_coefs(schedule, int(t), prediction)
        A, P0, P1, C0, C1, K_next = _unipc_terms(alpha, sigma, lam, i, orders[i])
        # x_i^c = corr + K x0 (i > 0) or x_t (i = 0); predictor and next corrector both start from it
        if i == 0:
            coefs = dict(c_xt=A, c_x0=P0, c_x0_prev=P1)
        else:
            coefs = dict(c_corr=A, c_x0=A * K + P0, c_x0_prev=P1)
        if i + 1 < n:   # the corrector at step i + 1 uses the order of this step's predictor
            start = dict(d_xt=A) if i == 0 else dict(d_corr=A)
            coefs.update(start, d_x0=(A * K if i else 0.0) + C0, d_x0_prev=C1)
            K = K_next
        out.append(Step(int(t), _coefs(a, b, clip, **coefs), multistep=True))
    return out


def make_steps(schedule: Schedule, sampler: str, steps: int | None = None, eta: float = 0.0,
               clip: float = 1.0, order: int | None = None, spacing: str = "linspace",
               prediction: str = "eps", lambda_min: float = LAMBDA_MIN, learned_variance: bool = False) -> list[Step]:
    """The plan of a sampler: ddpm (all T steps; learned_variance for a learned-sigma model), ddim (eta,
    timesteps linspace with t=0), or the multistep ODE solvers dpm++ and unipc (order, spacing,
    lambda_min). steps None: the sampler's default."""
    if sampler not in SAMPLERS:
        raise VditError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if learned_variance and sampler != "ddpm":
        raise VditError(f"learned variance is for ddpm's ancestral steps; {sampler} ignores a model's variance "
                        "channels (sample without learned_variance)")
    if order is not None and sampler not in MULTISTEP_ORDERS:
        raise VditError(f"{sampler} has no order option (it is for {' and '.join(MULTISTEP_ORDERS)})")
    if spacing != "linspace" and sampler not in MULTISTEP_ORDERS:
        raise VditError(f"{sampler} has no timestep spacing option (it is for {' and '.join(MULTISTEP_ORDERS)})")
    if sampler == "ddpm":
        if steps not in (None, schedule.num_timesteps):
            raise VditError(f"ddpm runs all {schedule.num_timesteps} steps; use --sampler ddim for {steps}")
        return ddpm_steps(schedule, clip, prediction, learned_variance)
    steps = DEFAULT_STEPS[sampler] if steps is None else steps
    if sampler == "ddim":
        return ddim_steps(schedule, steps, eta, clip, prediction)
    if eta:
        raise VditError(f"{sampler} is a deterministic ODE solver: eta must be 0, got {eta}")
    solver = dpm_solver_steps if sampler == "dpm++" else unipc_steps
    return solver(schedule, steps, 2 if order is None else order, spacing, prediction, clip, lambda_min)


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
