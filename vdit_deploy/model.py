"""The reference video diffusion transformer.

DiT (Peebles & Xie) with ViViT's tubelet embedding and factorised attention (Arnab et al. 2021):
  video (B, C, F, H, W) -> tubelets (B, F', S, D) with S = H'W' -> blocks with adaLN-Zero
  -> final adaLN layer -> un-patchify -> predicted noise (B, C, F, H, W).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vdit_deploy.config import ModelConfig


# ---- fixed sin-cos positions, separable into space and time --------------------------------
def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(N,) positions -> (N, dim) [sin | cos] table, as in "Attention is all you need"."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions.reshape(-1, 1).astype(np.float64) * omega[None]          # (N, dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_spatial(dim: int, h: int, w: int) -> np.ndarray:
    """(H'W', dim): half the channels encode the row, half the column (MAE / DiT style)."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], axis=1)


def sincos_video(dim: int, f: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Spatial (S, dim) and temporal (F', dim) tables; the position of token (f, s) is their sum."""
    return sincos_spatial(dim, h, w), sincos_1d(dim, np.arange(f))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x (B, ..., D); shift, scale (B, D) broadcast over the token axes
    view = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    return x * (1 + scale.view(view)) + shift.view(view)


# ---- conditioning ---------------------------------------------------------------------------
class TimestepEmbedder(nn.Module):
    """Scalar timestep -> sinusoidal frequencies -> MLP -> (B, D)."""

    def __init__(self, hidden_size: int, freq_size: int):
        super().__init__()
        self.freq_size = freq_size
        self.mlp = nn.Sequential(nn.Linear(freq_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]                                     # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)                 # (B, freq_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


# ---- attention ------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention over the second-to-last axis of (N, L, D)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, l, d = x.shape
        qkv = self.qkv(x).reshape(n, l, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)  # (N, heads, L, hd)
        return self.proj(out.transpose(1, 2).reshape(n, l, d))


def spatial_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """x (B, F', S, D): attend over the S tokens of each frame."""
    b, f, s, d = x.shape
    return attn(x.reshape(b * f, s, d)).reshape(b, f, s, d)


def temporal_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """x (B, F', S, D): attend over the F' frames at each spatial position."""
    b, f, s, d = x.shape
    y = attn(x.transpose(1, 2).reshape(b * s, f, d))                                # (B*S, F', D)
    return y.reshape(b, s, f, d).transpose(1, 2)


class SplitHeadAttention(nn.Module):
    """ViViT's factorised dot-product attention: half the heads attend over space, half over time,
    on the same q/k/v projections; the two halves are concatenated and projected."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, s, d = x.shape
        h, hd = self.num_heads // 2, d // self.num_heads
        qkv = self.qkv(x).reshape(b, f, s, 3, 2, h, hd)                             # 2 groups of h heads
        sp = qkv[:, :, :, :, 0].permute(3, 0, 1, 4, 2, 5).reshape(3, b * f, h, s, hd)
        tm = qkv[:, :, :, :, 1].permute(3, 0, 2, 4, 1, 5).reshape(3, b * s, h, f, hd)
        out_s = F.scaled_dot_product_attention(sp[0], sp[1], sp[2])                  # (B*F', h, S, hd)
        out_t = F.scaled_dot_product_attention(tm[0], tm[1], tm[2])                  # (B*S, h, F', hd)
        out_s = out_s.reshape(b, f, h, s, hd).permute(0, 1, 3, 2, 4)                 # (B, F', S, h, hd)
        out_t = out_t.reshape(b, s, h, f, hd).permute(0, 3, 1, 2, 4)                 # (B, F', S, h, hd)
        return self.proj(torch.cat([out_s, out_t], dim=3).reshape(b, f, s, d))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


# ---- blocks ---------------------------------------------------------------------------------
class VideoDiTBlock(nn.Module):
    """Pre-norm transformer block conditioned by adaLN-Zero: every sublayer gets a shift, a scale
    and a gate regressed from the conditioning vector; gates start at zero so each block starts
    as the identity."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.mode = cfg.attention
        if self.mode == "factorized":
            self.attn_space, self.attn_time = Attention(d, cfg.num_heads), Attention(d, cfg.num_heads)
            self.norms = nn.ModuleList(nn.LayerNorm(d, elementwise_affine=False, eps=1e-6) for _ in range(3))
        else:
            self.attn = (SplitHeadAttention if self.mode == "factorized_dot_product" else Attention)(d, cfg.num_heads)
            self.norms = nn.ModuleList(nn.LayerNorm(d, elementwise_affine=False, eps=1e-6) for _ in range(2))
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 3 * len(self.norms) * d))

    def sublayers(self):
        if self.mode == "factorized":
            return (lambda x: spatial_attention(self.attn_space, x),
                    lambda x: temporal_attention(self.attn_time, x), self.mlp)
        if self.mode == "factorized_dot_product":
            return self.attn, self.mlp
        return self._joint, self.mlp

    def _joint(self, x: torch.Tensor) -> torch.Tensor:
        b, f, s, d = x.shape
        return self.attn(x.reshape(b, f * s, d)).reshape(b, f, s, d)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x (B, F', S, D), c (B, D)
        mods = self.adaLN_modulation(c).chunk(3 * len(self.norms), dim=1)
        for i, (norm, layer) in enumerate(zip(self.norms, self.sublayers())):
            shift, scale, gate = mods[3 * i: 3 * i + 3]
            x = x + gate[:, None, None] * layer(modulate(norm(x), shift, scale))
        return x


class FinalLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        tt, p, _ = cfg.tubelet
        d = cfg.hidden_size
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.linear = nn.Linear(d, tt * p * p * cfg.in_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


# ---- the model ------------------------------------------------------------------------------
class VideoDiT(nn.Module):
    """Denoiser eps_theta(x_t, t, y): (B, C, F, H, W), (B,), (B,) int -> (B, C, F, H, W)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        f, h, w = cfg.grid
        self.tubelet_embed = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.tubelet, stride=cfg.tubelet)
        pos_space, pos_time = sincos_video(d, f, h, w)
        # Fixed (not learned, not saved): rebuilt from the config on load.
        self.register_buffer("pos_space", torch.from_numpy(pos_space).float(), persistent=False)  # (S, D)
        self.register_buffer("pos_time", torch.from_numpy(pos_time).float(), persistent=False)    # (F', D)
        self.t_embedder = TimestepEmbedder(d, cfg.freq_embed_size)
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, d)                     # last row: null label
        self.blocks = nn.ModuleList(VideoDiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(basic)
        w = self.tubelet_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))                            # like a Linear
        nn.init.zeros_(self.tubelet_embed.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: modulation and the output projection start at zero -> output exactly 0.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tubelet_embed(x)                                              # (B, D, F', H', W')
        b, d, f, h, w = tokens.shape
        tokens = tokens.reshape(b, d, f, h * w).permute(0, 2, 3, 1)                 # (B, F', S, D)
        return tokens + self.pos_time[:, None] + self.pos_space[None]

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, F', S, tt*p*p*C) -> (B, C, F, H, W)
        cfg = self.cfg
        tt, p, _ = cfg.tubelet
        f, h, w = cfg.grid
        b = x.shape[0]
        x = x.reshape(b, f, h, w, tt, p, p, cfg.in_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)                                       # (B, C, F', tt, H', p, W', p)
        return x.reshape(b, cfg.in_channels, cfg.frames, cfg.height, cfg.width)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.t_embedder(t) + self.y_embedder(y)                                 # (B, D)
        h = self.patchify(x)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))
