"""Model configuration: the one dataclass that flows from training to every runtime.

Kept free of torch so that runtimes on an edge box can read a config from ONNX metadata,
print FLOP counts (`vdit info`) and size buffers without importing the model.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from vdit_deploy.errors import VditError

ATTENTION_MODES = ("factorized", "factorized_dot_product", "joint")


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
        object.__setattr__(self, "tubelet", tuple(int(v) for v in self.tubelet))
        self.validate()

    def validate(self) -> None:
        tt, p, _ = self.tubelet
        if self.tubelet[1] != self.tubelet[2]:
            raise VditError(f"tubelet must be square in space (tt, p, p), got {self.tubelet}")
        for name, size, step in (("frames", self.frames, tt), ("height", self.height, p),
                                 ("width", self.width, p)):
            if size <= 0 or step <= 0 or size % step:
                raise VditError(f"{name}={size} is not divisible by the tubelet size {step} "
                                f"(tubelet {self.tubelet})")
        if self.attention not in ATTENTION_MODES:
            raise VditError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")
        if self.hidden_size % self.num_heads:
            raise VditError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.attention == "factorized_dot_product" and self.num_heads % 2:
            raise VditError("factorized_dot_product splits heads between space and time: num_heads must be even")
        if (self.hidden_size // self.num_heads) % 2 or self.hidden_size % 4:
            raise VditError(f"hidden_size={self.hidden_size} must be divisible by 4 for sin-cos positions")

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
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise VditError(f"unknown model config fields: {', '.join(sorted(unknown))}")
        try:
            return cls(**data)
        except TypeError as e:
            raise VditError(f"invalid model config: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


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
