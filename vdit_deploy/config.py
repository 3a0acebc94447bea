"""Model configuration: the one dataclass that flows from training to every runtime.

Kept free of torch so that runtimes on an edge box can read a config from ONNX metadata,
print FLOP counts (`vdit info`) and size buffers without importing the model.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

from vdit_deploy import validate as v
from vdit_deploy.errors import VditError

ATTENTION_MODES = ("factorized", "factorized_dot_product", "joint")
# Upper bounds that no model this toolchain runs comes near; they keep arithmetic on sizes (numpy shapes,
# int32 labels) sane. Whether a model fits in memory is decided by check_memory, not by these.
MAX_SIZE, MAX_WIDTH, MAX_DEPTH, MAX_CLASSES = 1 << 16, 1 << 16, 4096, 1 << 24


@dataclass(frozen=True)
class ModelConfig:
    # Input video latents (C, F, H, W) and the tubelet (tt, p, p) that cuts them into tokens.
    in_channels: int = 3
    frames: int = 8
    height: int = 16
    width: int = 16
    tubelet: tuple[int, int, int] = (2, 2, 2)
    # Transformer
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    attention: str = "factorized"
    # Conditioning: labels 0..num_classes-1; label num_classes is the null class for guidance.
    num_classes: int = 4
    freq_embed_size: int = 256

    def __post_init__(self):
        if not isinstance(self.tubelet, (list, tuple)) or len(self.tubelet) != 3:
            raise VditError(f"model config: tubelet must be a list of 3 integers, got {self.tubelet!r}")
        object.__setattr__(self, "tubelet", tuple(self.tubelet))
        self.validate()

    def validate(self, where: str = "model config") -> None:
        """Types, ranges and the cross-field rules: one VditError line for the first that fails."""
        for name in ("in_channels", "frames", "height", "width"):
            v.integer(getattr(self, name), name, 1, MAX_SIZE, where)
        v.int_list(list(self.tubelet), "tubelet", 3, 1, MAX_SIZE, where)
        v.integer(self.hidden_size, "hidden_size", 4, MAX_WIDTH, where)
        v.integer(self.depth, "depth", 1, MAX_DEPTH, where)
        v.integer(self.num_heads, "num_heads", 1, self.hidden_size, where)
        v.number(self.mlp_ratio, "mlp_ratio", 0, 64, lo_open=True, where=where)
        v.string(self.attention, "attention", ATTENTION_MODES, where)
        v.integer(self.num_classes, "num_classes", 1, MAX_CLASSES, where)
        v.integer(self.freq_embed_size, "freq_embed_size", 2, MAX_WIDTH, where)
        if self.freq_embed_size % 2:
            v.fail(where, f"freq_embed_size={self.freq_embed_size} must be even (sin and cos halves)")
        if int(self.hidden_size * self.mlp_ratio) < 1:
            v.fail(where, f"mlp_ratio={self.mlp_ratio} leaves the MLP no hidden units at hidden_size={self.hidden_size}")
        tt, p, _ = self.tubelet
        if self.tubelet[1] != self.tubelet[2]:
            v.fail(where, f"tubelet must be square in space (tt, p, p), got {self.tubelet}")
        for name, size, step in (("frames", self.frames, tt), ("height", self.height, p),
                                 ("width", self.width, p)):
            if size % step:
                v.fail(where, f"{name}={size} is not divisible by the tubelet size {step} (tubelet {self.tubelet})")
        if self.hidden_size % self.num_heads:
            v.fail(where, f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.attention == "factorized_dot_product" and self.num_heads % 2:
            v.fail(where, "factorized_dot_product splits heads between space and time: num_heads must be even")
        if (self.hidden_size // self.num_heads) % 2 or self.hidden_size % 4:
            v.fail(where, f"hidden_size={self.hidden_size} must be divisible by 4 for sin-cos positions")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (F', H', W') = (F/tt, H/p, W/p)."""
        tt, p, _ = self.tubelet
        return self.frames // tt, self.height // p, self.width // p

    @property
    def num_tokens(self) -> int:
        f, h, w = self.grid
        return f * h * w

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        return self.in_channels, self.frames, self.height, self.width

    @property
    def null_label(self) -> int:
        return self.num_classes

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- cost model ----------------------------------------------------------------------
    def flops(self, batch: int = 1) -> int:
        """Multiply-adds x 2 of one denoiser forward (matmuls and attention; norms and activations left out)."""
        d, n = self.hidden_size, self.num_tokens
        f, h, w = self.grid
        s = h * w
        tt, p, _ = self.tubelet
        patch_dim = self.in_channels * tt * p * p
        mlp = int(d * self.mlp_ratio)
        macs = n * patch_dim * d                                # tubelet embedding
        macs += self.freq_embed_size * d + d * d                # timestep MLP
        n_sub = 3 if self.attention == "factorized" else 2      # sublayers modulated by adaLN
        per_block = d * (3 * n_sub * d)                         # adaLN modulation (once per sample)
        per_block += n * 2 * d * mlp                            # MLP
        if self.attention == "factorized":
            per_block += 2 * n * 4 * d * d                      # qkv + proj, spatial and temporal
            per_block += 2 * n * d * (s + f)                    # QK^T and AV: over S, then over F'
        elif self.attention == "factorized_dot_product":
            per_block += n * 4 * d * d
            per_block += 2 * n * (d // 2) * (s + f)             # half the width over space, half over time
        else:
            per_block += n * 4 * d * d
            per_block += 2 * n * d * n
        macs += self.depth * per_block
        macs += d * 2 * d + n * d * patch_dim                   # final adaLN and projection
        return 2 * macs * batch

    def activation_elements(self) -> dict[str, int]:
        """Peak live elements of one sample's forward, per sublayer (the largest wins).

        A block's sublayer keeps the residual x (N, D) and its normalised input (N, D) alive while it makes
        qkv (N, 3D), attention logits and probabilities (2 x heads x L x L per attended sequence), and the
        attention output (N, D); the MLP makes its hidden (N, M) twice (pre- and post-GELU) and the output.
        Score matrices are an upper bound: fused attention kernels often never write them."""
        n, d, heads = self.num_tokens, self.hidden_size, self.num_heads
        f, h, w = self.grid
        s = h * w
        m = int(d * self.mlp_ratio)
        if self.attention == "factorized":           # spatial then temporal: the larger of the two sublayers
            scores = max(f * heads * s * s, s * heads * f * f)
        elif self.attention == "factorized_dot_product":   # half the heads over space, half over time, together
            scores = f * (heads // 2) * s * s + s * (heads // 2) * f * f
        else:                                        # joint: every token attends to all N
            scores = heads * n * n
        attention = 2 * n * d + 3 * n * d + 2 * scores + n * d
        mlp = 2 * n * d + 2 * n * m + n * d
        return {"attention": attention, "mlp": mlp}

    def memory_bytes(self, batch: int, training: bool = False) -> int:
        """fp32 bytes PyTorch needs for `batch` samples per forward: the weights (training: also the
        gradients, two AdamW moments and the EMA copy), the largest sublayer's live activations (training
        keeps every block's for the backward pass) and a few video-sized tensors."""
        weights = 4 * self.num_params()
        acts = 4 * batch * max(self.activation_elements().values())
        video = 4 * batch * math.prod(self.video_shape)
        if training:
            return 5 * weights + 2 * self.depth * acts + 4 * video
        return weights + acts + 6 * video

    def num_params(self) -> int:
        """Parameter count (exact: matches the torch module; no positional table, it is fixed)."""
        d = self.hidden_size
        tt, p, _ = self.tubelet
        patch_dim = self.in_channels * tt * p * p
        mlp = int(d * self.mlp_ratio)
        n_attn = 2 if self.attention == "factorized" else 1
        n_sub = 3 if self.attention == "factorized" else 2
        total = patch_dim * d + d                                          # Conv3d
        total += self.freq_embed_size * d + d + d * d + d                  # timestep MLP
        total += (self.num_classes + 1) * d                                # label table with null class
        attn = 3 * d * d + 3 * d + d * d + d
        block = n_attn * attn + (d * mlp + mlp + mlp * d + d) + (d * 3 * n_sub * d + 3 * n_sub * d)
        total += self.depth * block
        total += d * 2 * d + 2 * d + d * patch_dim + patch_dim             # final layer
        return total

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["tubelet"] = list(self.tubelet)
        return out

    @classmethod
    def from_dict(cls, data, where: str = "model config") -> "ModelConfig":
        known = [f.name for f in dataclasses.fields(cls)]
        v.obj(data, "model config", optional=known, where="" if where == "model config" else where)
        if "tubelet" in data:
            v.int_list(data["tubelet"], "tubelet", 3, 1, MAX_SIZE, where)
        try:
            return cls(**data)
        except VditError as e:
            if where == "model config":
                raise
            raise VditError(f"{where}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def available_memory() -> int:
    """Bytes this machine can still hand out (MemAvailable), else its physical memory."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(nbytes: int, what: str) -> None:
    """Refuse, before allocating, work that cannot fit: the OOM killer gives no error message."""
    limit = available_memory()
    if nbytes > limit:
        raise VditError(f"{what} needs about {nbytes / 2 ** 30:,.1f} GiB of memory, more than the "
                        f"{limit / 2 ** 30:,.1f} GiB available here; use a smaller model, batch or video")


# DiT's widths and depths (Peebles & Xie, Table 1). The tiny preset is the CPU-trainable demo.
# S..XL default to 4-channel 8x32x32 latents with 1x2x2 tubelets: 2048 tokens.
_LATENT = dict(in_channels=4, frames=8, height=32, width=32, tubelet=(1, 2, 2), num_classes=1000)
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "S": ModelConfig(hidden_size=384, depth=12, num_heads=6, **_LATENT),
    "B": ModelConfig(hidden_size=768, depth=12, num_heads=12, **_LATENT),
    "L": ModelConfig(hidden_size=1024, depth=24, num_heads=16, **_LATENT),
    "XL": ModelConfig(hidden_size=1152, depth=28, num_heads=16, **_LATENT),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise VditError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
