"""The video DiT families vdit knows by their diffusers class: one small file per family, and this registry.

Every graph and sampler takes x_t as (B, C, F, H, W); a family's adapter (base.Adapter) feeds the model
what its pipeline feeds it, inside the graph:
    layout       CogVideoX's (B, F, C, H, W) is a transpose; LTX-Video's packed tokens (B, S, C) a reshape
    latent       (C, F, H, W) from the config where it has one (Latte, CogVideoX), else the pipeline's
                 default resolution (`--latent` for another)
    cond         the conditioning inputs: graph input name, forward argument (kept apart: no collision
                 with the step graph's own inputs), role (cond, mask 0/1, per-call scalar)
    args         fixed arguments derived from the latent shape (LTX's num_frames/height/width and rope
                 scale) and position tables the pipeline builds (CogVideoX-5B's RoPE): recorded in the
                 contract (contract.family), baked into the graph as constants
    objective    what the scheduler config must be: ddpm (eps / v on a beta schedule) or flow
    batch        dynamic, or fixed (its forward pins the batch: export falls back with a one-line note)
The contract records the family, so every stage (the torch runtime too) rebuilds the same module from
an export alone. Any other ModelMixin goes through `--class/--input/--latent` (sources.py).
"""
from __future__ import annotations

import importlib

from vdit_deploy.errors import VditError

# diffusers class -> the module here that adapts it
MODULES = {"LatteTransformer3DModel": "latte", "CogVideoXTransformer3DModel": "cogvideox",
           "WanTransformer3DModel": "wan", "LTXVideoTransformer3DModel": "ltx",
           "MochiTransformer3DModel": "mochi", "HunyuanVideoTransformer3DModel": "hunyuan"}
# known classes vdit does not take yet, and why (one line at export)
REFUSED = {
    "AllegroTransformer3DModel": "its pipeline builds the 3D RoPE table outside the model and its batch is "
                                 "pinned by shape arithmetic: no adapter yet (without the table it runs silently wrong)",
    "CosmosTransformer3DModel": "Cosmos is sampled with EDM preconditioning (EDMEuler), which vdit's samplers do not "
                                "implement; its padding mask and SymFloat.sqrt also need a fixed batch",
}


class Family:
    """What vdit needs to know about one diffusers class (see the module docstring). Subclasses, one per
    file, override what differs from a (B, C, F, H, W) text-conditioned model."""
    name = ""
    cls = ""
    objective = "ddpm"               # ddpm | flow
    layout = "(B, C, F, H, W)"        # what the model is fed
    default_sampler = "unipc"
    dynamic_batch = True
    batch_note = ""                   # why the batch is fixed
    pipeline_latent: tuple = ()       # (F, H, W) at the pipeline's default size, when the config has none
    max_tokens = 120                  # the pipeline's max_sequence_length: the "seq" axis' upper end
    pipeline_sigmas = "default"       # the sigmas its pipeline hands a flow scheduler (flow.BASE_SIGMAS)

    def check(self, path, config: dict) -> None:
        """Refuse a variant of the class the adapter does not cover (one line)."""

    def latent(self, config: dict) -> tuple:
        return (int(config["in_channels"]), *self.pipeline_latent)

    def cond(self, config: dict) -> tuple:
        raise NotImplementedError

    def args(self, config: dict, latent: tuple) -> dict:
        """Fixed arguments (JSON) derived from the config and the latent shape."""
        return {}

    def record(self, config: dict, latent: tuple) -> dict:
        return {"name": self.name, "layout": self.layout, "args": self.args(config, latent)}

    def adapter(self, net, contract):
        """The torch module (x_t, t, *cond) -> out (B, kC, F, H, W) around the loaded diffusers model;
        by default the model takes that layout as it is (families/base.Adapter)."""
        from vdit_deploy.families.base import Adapter
        return Adapter(net, contract)

    def pipeline_schedule(self, schedule):
        """The schedule its pipeline samples with: a flow scheduler config's, on the pipeline's own sigmas
        (LTX-Video's linspace(1, 1/n, n), HunyuanVideo's linspace(1, 0, n + 1)[:-1]), not the scheduler's."""
        if getattr(schedule, "kind", "") != "flow" or self.pipeline_sigmas == "default":
            return schedule
        from dataclasses import replace
        return replace(schedule, base_sigmas=self.pipeline_sigmas)

    def row(self) -> dict:
        return {"class": self.cls, "objective": self.objective, "layout": self.layout,
                "sampler": self.default_sampler, "batch": "dynamic" if self.dynamic_batch else "fixed"}


def by_class(class_name: str) -> Family | None:
    """The family of a class name (module:Class or Class); None for a class vdit does not know; a known
    class it does not take is refused with the reason."""
    module, _, cls = class_name.rpartition(":")
    if module not in ("", "diffusers"):
        return None
    if cls in REFUSED:
        raise VditError(f"{cls} is not supported yet: {REFUSED[cls]}")
    return by_name(MODULES[cls]) if cls in MODULES else None


def by_name(name: str) -> Family:
    if name not in MODULES.values():
        raise VditError(f"unknown model family {name!r} (known: {', '.join(MODULES.values())}); re-export")
    return importlib.import_module(f"vdit_deploy.families.{name}").FAMILY


def all_families() -> list[Family]:
    return [by_name(name) for name in MODULES.values()]


def flow_supported() -> bool:
    """Whether the contract and the samplers take flow-matching models yet (issue 20)."""
    from vdit_deploy.contract import OUTPUTS

    return "flow" in OUTPUTS


def text_cond(width: int, doc: str, mask: bool = False) -> tuple:
    """A T5-style prompt: embeddings (batch, seq, width), and with `mask` the 0/1 attention mask."""
    from vdit_deploy.contract import BATCH, CondInput

    cond = (CondInput("encoder_hidden_states", "float32", (BATCH, "seq", width), doc=doc),)
    if mask:
        cond += (CondInput("encoder_attention_mask", "float32", (BATCH, "seq"), role="mask",
                           doc="1 = a prompt token, 0 = padding"),)
    return cond
