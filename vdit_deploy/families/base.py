"""The torch side of a family: the module every graph traces, (x_t, t, *cond) -> out (B, kC, F, H, W)."""
from __future__ import annotations

import torch
import torch.nn as nn


class Adapter(nn.Module):
    """A diffusers video transformer called as its pipeline calls it. x_t is (B, C, F, H, W) and t (B,)
    float32 in every graph; `feed` turns them and the conditioning (by forward argument) into the
    model's keyword arguments, `unfeed` turns its output back into (B, kC, F, H, W)."""

    def __init__(self, net: nn.Module, contract):
        super().__init__()
        self.net = net
        self.arguments = tuple(c.argument for c in contract.cond)
        self.latent = tuple(contract.latent)
        self.args = dict(contract.family.get("args", {}))

    def forward(self, x_t, t, *cond):
        kwargs = self.feed(x_t, t, dict(zip(self.arguments, cond)))
        return self.unfeed(self.net(**kwargs, return_dict=False)[0])

    def feed(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> dict:
        return {"hidden_states": x_t, "timestep": t, **cond}

    def unfeed(self, out: torch.Tensor) -> torch.Tensor:
        return out
