"""A sampler step in torch, as the step graph computes it: the affine update of samplers.apply_step,
classifier-free guidance over the 2B batch, and the modules the torch runtime runs (FusedStep: a guided
step; Unguided: one B batch). step.onnx is composed from denoiser.onnx and GuidedUpdate traced alone
(onnx_export.compose_step)."""
from __future__ import annotations

import torch
import torch.nn as nn


def apply_step(x_t, out, coefs, noise, x0_prev, corr) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """samplers.apply_step in torch, op for op (tests compare the graph with the numpy version).
    `out` is the model output: eps, v or x0 in its first C channels (the coefs convert), then, for an
    eps+var model, the learned variance v_var in [-1, 1]: DDPM's noise std is then
    exp((log_var_min + (v_var + 1) / 2 (log_var_max - log_var_min)) / 2) (Nichol & Dhariwal 2021)."""
    (a, b, clip, c_x0, c_xt, c_eps, sigma, c_x0_prev, c_corr, d_x0, d_xt, d_x0_prev, d_corr,
     log_var_min, log_var_max, learned_var) = coefs.unbind(0)
    c = x_t.shape[1]
    pred = out[:, :c]
    ax = a * x_t
    x0 = torch.minimum(torch.maximum(ax - b * pred, -clip), clip)                # Min/Max: no Clip-with-inputs
    eps_hat = (ax - x0) / b
    x_prev = c_x0 * x0 + c_xt * x_t + c_eps * eps_hat
    x_prev = x_prev + c_x0_prev * x0_prev + c_corr * corr
    corr_next = d_x0 * x0 + d_xt * x_t + d_x0_prev * x0_prev + d_corr * corr
    std = sigma                                                                   # sigma = 0: noise is zeros
    if out.shape[1] == 2 * c:                                                     # eps+var: learned std
        frac = (out[:, c:] + 1) * 0.5
        std = std + learned_var * torch.exp(0.5 * (log_var_min + frac * (log_var_max - log_var_min)))
    return x_prev + std * noise, x0, corr_next


def guide(out_cond, out_null, guidance, channels: int):
    """Classifier-free guidance on the prediction's C channels; a learned variance comes from the
    conditional pass (as DiT does: guidance would push it out of [-1, 1])."""
    pred = out_null[:, :channels] + guidance * (out_cond[:, :channels] - out_null[:, :channels])
    return torch.cat([pred, out_cond[:, channels:]], 1) if out_cond.shape[1] > channels else pred


class GuidedUpdate(nn.Module):
    """What follows the 2B denoiser call in a guided step: (x_t, out (2B, kC, F, H, W), guidance, coefs,
    noise, x0_prev, corr) -> (x_prev, x0, corr_next)."""

    def forward(self, x_t, out, guidance, coefs, noise, x0_prev, corr):
        b = x_t.shape[0]
        out = guide(out[:b], out[b:], guidance, x_t.shape[1])     # slices, not chunk(2): chunk pins B
        return apply_step(x_t, out, coefs, noise, x0_prev, corr)


class FusedStep(nn.Module):
    """One guided sampler step: (x_t, t, *cond, *null_cond, guidance, coefs, noise, x0_prev, corr)
    -> (x_prev, x0, corr_next). step.onnx is this, built from denoiser.onnx (compose_step)."""

    def __init__(self, denoiser: nn.Module, n_cond: int):
        super().__init__()
        self.denoiser, self.n_cond, self.update = denoiser, n_cond, GuidedUpdate()

    def forward(self, x_t, t, *rest):
        n = self.n_cond
        cond, null, tail = rest[:n], rest[n:2 * n], rest[2 * n:]
        both = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]),
                             *(torch.cat([c, u]) for c, u in zip(cond, null)))   # (2B, kC, F, H, W)
        return self.update(x_t, both, *tail)


class Unguided(nn.Module):
    """A step without classifier-free guidance: one B batch, then the same update as FusedStep."""

    def __init__(self, denoiser: nn.Module, n_cond: int):
        super().__init__()
        self.denoiser, self.n_cond = denoiser, n_cond

    def forward(self, x_t, t, *rest):
        cond, (coefs, noise, x0_prev, corr) = rest[:self.n_cond], rest[self.n_cond:]
        return apply_step(x_t, self.denoiser(x_t, t, *cond), coefs, noise, x0_prev, corr)
