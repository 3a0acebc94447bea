"""Multistep ODE solvers in data prediction (x0) form on any grid of (alpha, sigma): the coefficients
of DPM-Solver++(2M) and UniPC-bh2 as diffusers computes them, for the DDPM-family plans (samplers.py)
and the flow ones (flow_samplers.py, alpha = 1 - sigma)."""
from __future__ import annotations

import numpy as np

from vdit_deploy.errors import VditError

MULTISTEP_ORDERS = {"dpm++": (1, 2), "unipc": (1, 2)}

# ---- multistep ODE solvers in data prediction (x0) form ------------------------------------------
# alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t) (flow: 1 - sigma and sigma), lambda_t = log(alpha_t /
# sigma_t); the last step goes to the clean video (alpha 1, sigma 0, lambda +inf), as DDIM does and
# diffusers' final_sigmas_type="zero". With h = lambda_next - lambda_now both solvers need exp(-h) =
# (sigma_next / alpha_next) / (sigma_now / alpha_now), which is 0 at the clean end, and lambda
# differences of earlier steps, which are finite. The cores take the grid and give the coefficients
# of x_t, x0 and the state; the plans add the prediction's (a, b).

def check_order(sampler: str, order: int) -> None:
    if order == 3 and sampler in MULTISTEP_ORDERS:
        raise VditError(f"{sampler} order 3 is not run: it needs the two previous x0 in the fused step graph's "
                        "state, which carries one (orders 1 and 2)")
    if order not in MULTISTEP_ORDERS[sampler]:
        have = " and ".join(map(str, MULTISTEP_ORDERS[sampler]))
        raise VditError(f"{sampler} has orders {have}, got {order}")


def grid_lambdas(alpha: np.ndarray, sigma: np.ndarray):
    """(alpha, sigma, lambda) with the clean end (alpha 1, sigma 0) appended."""
    alpha, sigma = np.append(alpha, 1.0), np.append(sigma, 0.0)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    return alpha, sigma, lam


def dpm_core(alpha, sigma, lam, order: int) -> list[dict]:
    """DPM-Solver++(2M) (Lu et al. 2022, midpoint form as in diffusers): first order at the first step
    and at the last one (to sigma 0, where the second-order term is undefined), second order between:

        x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) (x0 + (x0 - x0_prev) / (2 r)),
        r = (lambda - lambda_prev) / h."""
    n, out = len(alpha) - 1, []
    for i in range(n):
        exp_neg_h = (sigma[i + 1] / alpha[i + 1]) / (sigma[i] / alpha[i])
        c_x0 = -alpha[i + 1] * (exp_neg_h - 1.0)               # first order: DDIM in x0 form
        c_x0_prev = 0.0
        if order == 2 and 0 < i < n - 1:
            r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
            c_x0, c_x0_prev = c_x0 * (1 + 0.5 / r), -c_x0 * 0.5 / r
        out.append(dict(c_x0=c_x0, c_xt=sigma[i + 1] / sigma[i], c_x0_prev=c_x0_prev))
    return out




def unipc_terms(alpha, sigma, lam, i: int, order: int) -> tuple[float, float, float, float, float, float]:
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


def unipc_core(alpha, sigma, lam, order: int) -> list[dict]:
    """UniPC with the bh2 predictor and corrector (diffusers' UniPCMultistepScheduler, predict_x0).
    At step i the model sees the predicted x_i; the corrected x_i = corr + K_i x0 (x_0 itself at i = 0)
    feeds the predictor of x_{i+1} and, through corr', the corrector at step i+1. Orders follow diffusers:
    1 at the first and the last step (lower_order_final), `order` between; each corrector has the order
    of the predictor before it. The last predictor's output is the sample (no corrector after it)."""
    n = len(alpha) - 1
    orders = [min(order, n - i, i + 1) for i in range(n)]
    out, K = [], 0.0
    for i in range(n):
        A, P0, P1, C0, C1, K_next = unipc_terms(alpha, sigma, lam, i, orders[i])
        # x_i^c = corr + K x0 (i > 0) or x_t (i = 0); predictor and next corrector both start from it
        if i == 0:
            c = dict(c_xt=A, c_x0=P0, c_x0_prev=P1)
        else:
            c = dict(c_corr=A, c_x0=A * K + P0, c_x0_prev=P1)
        if i + 1 < n:   # the corrector at step i + 1 uses the order of this step's predictor
            start = dict(d_xt=A) if i == 0 else dict(d_corr=A)
            c.update(start, d_x0=(A * K if i else 0.0) + C0, d_x0_prev=C1)
            K = K_next
        out.append(c)
    return out
