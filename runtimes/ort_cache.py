"""Step caching on ONNX Runtime: the head/tail graphs of `vdit export --cache-split K` (export/cache_export.py).

A guided step runs step-head.onnx (the 2B cond + null rows, guidance and the update inside) and, when
the cache policy (step_cache.py) does not skip it, step-tail.onnx; an unguided one the denoiser head and
tail with the update on the host. The cache's reference tensors stay numpy arrays between steps.
"""
from __future__ import annotations

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.export.cache_export import head_outputs, tail_inputs, tail_outputs
from vdit_deploy.export.metadata import NULL_PREFIX, STEP_STATE
from vdit_deploy.export.variants import CACHE_KINDS, DENOISER_HEAD, DENOISER_TAIL, STEP_HEAD, STEP_TAIL, find_variant
from vdit_deploy.samplers import apply_step
from vdit_deploy.step_cache import REFS


class OrtCache:
    """The four split graphs of an export directory, loaded when a cached step first asks for them."""

    def __init__(self, export_dir, graph_cls, providers, options):
        paths = {kind: find_variant(export_dir, kind) for kind in CACHE_KINDS}
        missing = [k for k, p in paths.items() if p is None]
        if missing:
            raise VditError(f"{export_dir} has no step-caching graphs ({', '.join(missing)}.onnx): export with "
                            "`vdit export --cache-split 1` to sample with --cache")
        self.graphs = {kind: graph_cls(path, kind, providers, options) for kind, path in paths.items()}
        self.meta = self.graphs[DENOISER_HEAD].meta.cache
        self.ref_dims = {}   # ref name -> the dims after the rows, from the head's inputs
        for i in self.graphs[DENOISER_HEAD].session.get_inputs():
            if i.name in REFS:
                self.ref_dims[i.name] = tuple(int(d) for d in i.shape[1:])

    @property
    def blocks(self) -> int:
        return int(self.meta["blocks"])

    @property
    def files(self) -> list:
        return [g.path for g in self.graphs.values()]

    def refs(self, cache, rows: int) -> dict:
        """The cache's reference tensors, zeros where there are none yet (or of another batch)."""
        out = {}
        for name in REFS:
            value = cache.refs.get(name)
            shape = (rows, *self.ref_dims[name])
            out[name] = np.asarray(value, np.float32) if value is not None and np.shape(value) == shape \
                else np.zeros(shape, np.float32)
        return out

    def step(self, rt, x_t, t: int, cond, guidance: float, coefs, noise, state, cache):
        x = np.asarray(x_t, np.float32)
        b = x.shape[0]
        ts = np.full(b, t, np.float32)
        cond = rt.check_inputs(x, ts, cond)
        guided = guidance != 1.0
        rows = 2 * b if guided else b
        zeros = np.zeros_like(x)
        solver = {name: zeros if getattr(state, name, None) is None else np.asarray(getattr(state, name), np.float32)
                  for name, _ in STEP_STATE}
        update = dict(guidance=np.float32([guidance]), coefs=np.asarray(coefs, np.float32), noise=noise, **solver)
        if guided:
            head, tail = self.graphs[STEP_HEAD], self.graphs[STEP_TAIL]
            head.check_batch(b)
            null = {NULL_PREFIX + k: v for k, v in rt.contract.null_batch(rt.null, cond).items()}
            feeds = dict(x_t=x, t=ts, **cond, **null, **self.refs(cache, rows), **update)
        else:
            head, tail = self.graphs[DENOISER_HEAD], self.graphs[DENOISER_TAIL]
            head.check_batch(b)
            feeds = dict(x_t=x, t=ts, **cond, **self.refs(cache, rows))
        outs = dict(zip(head_outputs(self.meta, guided), head.run_all(**feeds)))
        skip = cache.decide(outs["stats"])
        tail_residual = None
        if not skip:
            tail_feeds = {n: outs[n] for n in tail_inputs(self.meta, False)}
            if guided:
                tail_feeds.update(x_t=x, **update)
            outs.update(zip(tail_outputs(guided), tail.run_all(**tail_feeds)))
            tail_residual = outs["tail_residual"]
        cache.update_refs(skip, outs["residual"], outs["modulated"], tail_residual)
        if not guided:
            return apply_step(x, outs["out"], coefs, noise, state)
        if state is not None:
            for name, out in STEP_STATE:
                setattr(state, name, outs[out])
        return outs["x_prev"]
