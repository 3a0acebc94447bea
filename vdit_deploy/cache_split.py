"""A denoiser cut after its first K blocks, for step caching (step_cache.py): head and tail modules.

    head(x_t, t, *cond, residual_ref, modulated_ref, tail_residual)
        -> hidden h_K, *ctx, residual h_K - h_0, modulated, stats (4,), out_skip
    tail(hidden, *ctx) -> out, tail_residual h_N - h_K

ctx is what the blocks and the final layer read besides the hidden state (the conditioning vector, a
text model's projected prompt ...); out_skip = final(h_K + tail_residual) is a skipped step's output
(the cached residual stands in for blocks K..N-1), so head + tail = the full model, and a skipped step
runs the head alone. Every tensor is batch first, so a guided step runs both on its 2B rows.

A model is split through an adapter that knows its blocks (as diffusers' FirstBlockCache hooks find
`transformer_blocks`): the built-in VideoDiT, diffusers' LatteTransformer3DModel, whose spatial
and temporal blocks alternate, a pair being one block here, and WanTransformer3DModel (text-to-video).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vdit_deploy.errors import VditError


class VideoDiTBlocks(nn.Module):
    """The built-in model (model.VideoDiT) as embed / block i / modulated / final. h: (B, F', S, D)."""
    ctx_names = ("c",)

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.depth = len(model.blocks)

    def ctx_axes(self, contract):
        return [["batch", None]]

    def embed(self, x_t, t, y):
        m = self.model
        return m.patchify(x_t), (m.t_embedder(t) + m.y_embedder(y),)            # (B, F', S, D), ((B, D),)

    def modulated(self, h, ctx):
        """The first block's first sublayer input: LayerNorm, then the shift and scale of t and y."""
        from vdit_deploy.model import modulate

        block = self.model.blocks[0]
        shift, scale = block.adaLN_modulation(ctx[0]).chunk(3 * len(block.norms), dim=1)[:2]
        return modulate(block.norms[0](h), shift, scale)

    def block(self, i, h, ctx):
        return self.model.blocks[i](h, ctx[0])

    def final(self, h, ctx):
        return self.model.unpatchify(self.model.final_layer(h, ctx[0]))


class LatteBlocks(nn.Module):
    """diffusers' LatteTransformer3DModel (its forward, cut into pieces; enable_temporal_attentions on).
    Block i is spatial block i then temporal block i. h: (B, F, S, D); ctx: the adaLN-single timestep
    (B, 6D), the embedded timestep (B, D), the projected prompt (B, seq, D)."""
    ctx_names = ("timestep", "embedded_timestep", "prompt")

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.depth = len(net.transformer_blocks)
        if net.adaln_single is None or net.config.norm_type != "ada_norm_single":
            raise VditError("step caching splits a LatteTransformer3DModel with norm_type ada_norm_single (as Latte-1)")

    def ctx_axes(self, contract):
        return [["batch", None], ["batch", None], ["batch", "seq", None]]

    def embed(self, x_t, t, ehs):
        net = self.net
        b, c, f, hh, ww = x_t.shape
        x = x_t.permute(0, 2, 1, 3, 4).reshape(-1, c, hh, ww)                       # (B F, C, H, W)
        tokens = net.pos_embed(x)                                                   # (B F, S, D)
        timestep, embedded = net.adaln_single(t, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                              batch_size=b, hidden_dtype=tokens.dtype)
        prompt = net.caption_projection(ehs)                                        # (B, seq, D)
        return tokens.reshape(b, f, *tokens.shape[1:]), (timestep, embedded, prompt)

    def modulated(self, h, ctx):
        block, (timestep, _, _) = self.net.transformer_blocks[0], ctx
        b, f, s, d = h.shape
        shift, scale = (block.scale_shift_table[None] + timestep.reshape(b, 6, -1)).chunk(6, dim=1)[:2]
        return block.norm1(h) * (1 + scale[:, None]) + shift[:, None]             # (B, F, S, D)

    def block(self, i, h, ctx):
        net, (timestep, _, prompt) = self.net, ctx
        b, f, s, d = h.shape
        spatial = h.reshape(b * f, s, d)
        prompt_f = prompt.repeat_interleave(f, dim=0)                               # (B F, seq, D)
        t_f = timestep.repeat_interleave(f, dim=0)
        spatial = net.transformer_blocks[i](spatial, None, prompt_f, None, t_f, None, None)
        temporal = spatial.reshape(b, f, s, d).permute(0, 2, 1, 3).reshape(b * s, f, d)   # (B S, F, D)
        if i == 0 and f > 1:
            temporal = temporal + net.temp_pos_embed.to(temporal.dtype)
        temporal = net.temporal_transformer_blocks[i](temporal, None, None, None, timestep.repeat_interleave(s, dim=0),
                                                      None, None)
        return temporal.reshape(b, s, f, d).permute(0, 2, 1, 3)

    def final(self, h, ctx):
        net, (_, embedded, _) = self.net, ctx
        b, f, s, d = h.shape
        x = h.reshape(b * f, s, d)
        emb = embedded.repeat_interleave(f, dim=0)
        shift, scale = (net.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)
        x = net.proj_out(net.norm_out(x) * (1 + scale) + shift)
        p, c = net.config.patch_size, net.out_channels
        hh = ww = net.config.sample_size // p                                       # Latte's latents are square
        x = x.reshape(b * f, hh, ww, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x).reshape(b * f, c, hh * p, ww * p)
        return x.reshape(b, f, c, hh * p, ww * p).permute(0, 2, 1, 3, 4)


class WanBlocks(nn.Module):
    """diffusers' WanTransformer3DModel, text-to-video (its forward, cut into pieces). h: (B, S, D); ctx:
    the timestep projection (B, 6, D), the embedded timestep (B, D), the projected prompt (B, seq, D).
    Its 3D RoPE is no ctx: it has no batch axis ((1, S, 1, d) cos and sin) and depends on the latent's
    shape alone, so each graph computes it from the static latent (constants after tracing)."""
    ctx_names = ("timestep_proj", "embedded_timestep", "prompt")

    def __init__(self, net, latent):
        super().__init__()
        self.net, self.latent = net, tuple(int(d) for d in latent)             # (C, F, H, W)
        self.depth = len(net.blocks)

    def ctx_axes(self, contract):
        return [["batch", None, None], ["batch", None], ["batch", "seq", None]]

    def rope(self, h):
        return self.net.rope(h.new_zeros(1, *self.latent))                     # reads the shape only

    def embed(self, x_t, t, ehs):
        net = self.net
        tokens = net.patch_embedding(x_t).flatten(2).transpose(1, 2).contiguous()  # (B, S, D)
        temb, proj, prompt, _ = net.condition_embedder(t, ehs, None)
        return tokens, (proj.unflatten(1, (6, -1)), temb, prompt)

    def modulated(self, h, ctx):
        block = self.net.blocks[0]
        shift, scale = (block.scale_shift_table + ctx[0].float()).chunk(6, dim=1)[:2]
        return (block.norm1(h.float()) * (1 + scale) + shift).type_as(h)         # (B, S, D)

    def block(self, i, h, ctx):
        proj, _, prompt = ctx
        return self.net.blocks[i](h, prompt, proj, self.rope(h))

    def final(self, h, ctx):
        net, (_, temb, _) = self.net, ctx
        shift, scale = (net.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = net.proj_out((net.norm_out(h.float()) * (1 + scale) + shift).type_as(h))
        (pt, ph, pw), (_, f, hh, ww) = net.config.patch_size, self.latent
        x = x.reshape(h.shape[0], f // pt, hh // ph, ww // pw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def adapter_for(module: nn.Module) -> nn.Module:
    """The block adapter of a source's module (sources.py: the VideoDiT itself, or a DiffusersDenoiser)."""
    from vdit_deploy.model import VideoDiT

    if isinstance(module, VideoDiT):
        return VideoDiTBlocks(module)
    net = getattr(module, "net", None)
    if net is not None and type(net).__name__ == "LatteTransformer3DModel":
        return LatteBlocks(net)
    if net is not None and type(net).__name__ == "WanTransformer3DModel":
        return WanBlocks(net, module.latent)
    raise VditError(f"step caching cannot split {type(net or module).__name__}: it knows the built-in VideoDiT and "
                    "diffusers' LatteTransformer3DModel and WanTransformer3DModel (their blocks)")


def l1_stats(residual, residual_ref, modulated, modulated_ref) -> torch.Tensor:
    """step_cache.STATS over the whole call, in float32 sums (step_cache.rel_l1_stats is the numpy twin)."""
    l1 = lambda a: a.abs().float().sum()                      # fp16 sums of a whole call would overflow
    return torch.stack([l1(residual - residual_ref), l1(residual_ref), l1(modulated - modulated_ref), l1(modulated_ref)])


class Head(nn.Module):
    def __init__(self, blocks: nn.Module, k: int, n_cond: int):
        super().__init__()
        if not 1 <= k < blocks.depth:
            raise VditError(f"--cache-split must be 1..{blocks.depth - 1} (the model has {blocks.depth} blocks), got {k}")
        self.blocks, self.k, self.n_cond = blocks, k, n_cond

    def forward(self, x_t, t, *rest):
        cond = rest[:self.n_cond]
        residual_ref, modulated_ref, tail_residual = rest[self.n_cond:]
        h0, ctx = self.blocks.embed(x_t, t, *cond)
        modulated = self.blocks.modulated(h0, ctx)
        h = h0
        for i in range(self.k):
            h = self.blocks.block(i, h, ctx)
        residual = h - h0
        stats = l1_stats(residual, residual_ref, modulated, modulated_ref)
        return (h, *ctx, residual, modulated, stats, self.blocks.final(h + tail_residual, ctx))


class Tail(nn.Module):
    def __init__(self, blocks: nn.Module, k: int):
        super().__init__()
        self.blocks, self.k = blocks, k

    def forward(self, hidden, *ctx):
        h = hidden
        for i in range(self.k, self.blocks.depth):
            h = self.blocks.block(i, h, ctx)
        return self.blocks.final(h, ctx), h - hidden


def split(module: nn.Module, k: int, n_cond: int) -> tuple[Head, Tail]:
    blocks = adapter_for(module)
    return Head(blocks, k, n_cond).eval(), Tail(blocks, k).eval()
