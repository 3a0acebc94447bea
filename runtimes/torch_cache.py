"""Step caching on PyTorch: the same head and tail as the exported graphs (cache_split.py), on the device.

The cache policy (step_cache.py) reads the head's four stats on the host: one small copy per step; the
reference tensors and the cached tail residual stay device tensors between steps.
"""
from __future__ import annotations

import numpy as np
import torch

from vdit_deploy.export.metadata import STEP_STATE


class TorchCache:
    def __init__(self, rt, blocks: int):
        from vdit_deploy.cache_split import split
        from vdit_deploy.export.step_module import GuidedUpdate

        self.rt, self.blocks = rt, blocks
        self.head, self.tail = split(rt.model, blocks, len(rt.contract.names))
        self.update = GuidedUpdate()

    @torch.inference_mode()
    def step(self, x_t, t: int, cond, guidance: float, coefs, noise, state, cache):
        from vdit_deploy.export.step_module import apply_step
        from vdit_deploy.runtimes.torch_tensors import DTYPES, TorchDeviceArray

        rt = self.rt
        dtype = DTYPES[rt.precision]
        b = x_t.shape[0]
        x, cond, solver = rt.device_inputs(x_t, cond, state)
        guided = guidance != 1.0
        t_, cond_ = rt._tensor(np.full(b, t, np.float32)), rt._cond(cond)
        if guided:
            null_ = rt._cond(rt.contract.null_batch(rt.null, cond))
            xs, ts, conds = torch.cat([x, x]), torch.cat([t_, t_]), [torch.cat([c, u]) for c, u in zip(cond_, null_)]
        else:
            xs, ts, conds = x, t_, cond_
        rows = xs.shape[0]
        refs = [cache.refs.get(name) for name in ("residual_ref", "modulated_ref", "tail_residual")]
        refs = [r if isinstance(r, torch.Tensor) and r.shape[0] == rows else torch.zeros(1, device=x.device, dtype=dtype)
                for r in refs]
        h, *rest = self.head(xs.to(dtype), ts, *conds, *refs)
        ctx, (residual, modulated, stats, out) = rest[:-4], rest[-4:]
        skip = cache.decide(stats.float().cpu().numpy())
        tail_residual = None
        if not skip:
            out, tail_residual = self.tail(h, *ctx)
        cache.update_refs(skip, residual, modulated, tail_residual)
        coefs_, noise_ = rt._tensor(np.asarray(coefs, np.float32)), rt._tensor(noise)
        out = out.float()
        if guided:
            x_prev, *next_state = self.update(x, out, rt._tensor(np.float32([guidance])), coefs_, noise_, *solver)
        else:
            x_prev, *next_state = apply_step(x, out, coefs_, noise_, *solver)
        if state is not None:
            for (name, _), value in zip(STEP_STATE, next_state):
                setattr(state, name, TorchDeviceArray(value))
        return TorchDeviceArray(x_prev)
