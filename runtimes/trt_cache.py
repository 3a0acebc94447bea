"""Step caching on TensorRT: two engines, step-head and step-tail (export/cache_export.py), on the runtime's
stream, each replayed as its own CUDA graph after one eager warm-up run.

The tail reads the head's buffers in place (hidden, ctx, the video, the solver state, guidance, coefs,
noise) and writes the step's outputs over the head's: a skipped step keeps the head's (the cached tail
residual stood in for the tail), a full one overwrites them, and its tail residual lands in the head's
tail_residual input for the steps after it. Per step the host reads the head's four stats (16 bytes,
one stream sync: the decision is the host's, step_cache.py, the same as every runtime's) and launches
the tail graph or not. Then device-to-device copies move the outputs to the inputs (x_prev -> x_t,
x0 -> x0_prev, corr_next -> corr, modulated -> modulated_ref, residual -> residual_ref on full steps),
so the video never leaves the GPU.
"""
from __future__ import annotations

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.export.cache_export import REF_INPUTS, ctx_inputs, tail_inputs
from vdit_deploy.export.metadata import STEP_STATE
from vdit_deploy.runtimes.engine_cache import check_cuda

D2H, D2D = 2, 3   # cudaMemcpyKind values
MOVES = (("x_prev", "x_t"), *((o, i) for i, o in STEP_STATE))   # after every step: output -> next input


class TrtCache:
    def __init__(self, rt):
        from vdit_deploy.export.metadata import find_onnx, read_metadata
        from vdit_deploy.export.variants import STEP_HEAD, STEP_TAIL
        from vdit_deploy.runtimes.trt_engine import _Engine

        self.rt = rt
        metas = {kind: read_metadata(find_onnx(rt.export, kind)) for kind in (STEP_HEAD, STEP_TAIL)}
        self.meta = metas[STEP_HEAD].cache
        axes = {s["name"]: s["shape"] for m in metas.values() for io in (m.io["inputs"], m.io["outputs"]) for s in io}
        self.head, self.tail = (_Engine(rt.trt, rt.cudart, rt._engine_path(kind), rt.stream, rt.logger, axes)
                                for kind in (STEP_HEAD, STEP_TAIL))
        head, tail = self.head, self.tail
        shared = [n for n in tail.inputs if n in head.buffers] + [n for n in tail.outputs if n in head.buffers]
        if set(shared) != {*tail.inputs, *tail.outputs}:
            raise VditError(f"{tail.path.name} does not fit {head.path.name} (rebuild both with `vdit build`)")
        for name in shared:                      # the tail works in the head's buffers, not its own
            tail.bind(name, head.buffers[name])
            rt.cudart.cudaFree(tail.buffers.pop(name))
        self.graphs, self.warm = {}, set()
        self.stats = np.zeros(4, np.float32)
        self.serial = None                       # rt.serial after this cache's last step

    def _run(self, which: str, engine) -> None:
        rt = self.rt
        if which in self.graphs:
            check_cuda(rt.cudart.cudaGraphLaunch(self.graphs[which], rt.stream), "cudaGraphLaunch")
            return
        if rt.cuda_graph and which in self.warm:
            graph_exec = rt._capture_graph(engine.execute)
            if graph_exec is not None:
                self.graphs[which] = graph_exec
                check_cuda(rt.cudart.cudaGraphLaunch(graph_exec, rt.stream), "cudaGraphLaunch")
                return
        engine.execute()                         # eager: the warm-up, and the fall-back
        self.warm.add(which)

    def drop_graphs(self) -> None:
        for graph_exec in self.graphs.values():
            self.rt.cudart.cudaGraphExecDestroy(graph_exec)
        self.graphs, self.warm = {}, set()

    def _copy(self, dst: str, src: str, nbytes: int) -> None:
        b = self.head.buffers
        check_cuda(self.rt.cudart.cudaMemcpyAsync(b[dst], b[src], nbytes, self.rt.cudart.cudaMemcpyKind(D2D),
                                                  self.rt.stream), f"copy {src} to {dst}")

    def _zero(self, name: str, nbytes: int) -> None:
        check_cuda(self.rt.cudart.cudaMemsetAsync(self.head.buffers[name], 0, nbytes, self.rt.stream), "cudaMemsetAsync")

    def _mine(self, value) -> bool:
        from vdit_deploy.runtimes.trt_engine import TrtDeviceArray

        return isinstance(value, TrtDeviceArray) and value.runtime is self.rt and value.serial == self.rt.serial \
            and self.serial == self.rt.serial

    def step(self, x_t, t: int, cond, guidance: float, coefs, noise, state, cache):
        from vdit_deploy.runtimes.trt_engine import TrtDeviceArray
        from vdit_deploy.samplers import Step

        rt, head, tail, cudart = self.rt, self.head, self.tail, self.rt.cudart
        coefs = np.asarray(coefs, np.float32)
        b = x_t.shape[0]
        cond = rt.contract.check_cond(cond, b)
        rows, video = 2 * b, (b, *rt.contract.latent)
        video_bytes = b * rt.video_elements * 4
        shapes = {name: video for name in ("x_t", "noise", *(i for i, _ in STEP_STATE))}
        shapes.update({"t": (b,), **{n: a.shape for n, a in cond.items()},
                       **{rt.null_names[n]: a.shape for n, a in cond.items()},
                       **{n: (rows, *head.shapes[n][1:]) for n in REF_INPUTS}})
        changed = head.set_shapes(shapes)
        tail_shapes = {n: video for n in ("x_t", "noise", *(i for i, _ in STEP_STATE))}
        tail_shapes.update({n: head.out_shape(n) for n in ("hidden", *ctx_inputs(self.meta))})
        changed = tail.set_shapes(tail_shapes) or changed
        if changed:
            self.drop_graphs()                   # graphs hold the old shapes
        if not self._mine(x_t):                  # x_T from the host, or a video from elsewhere
            x_host = np.asarray(x_t, np.float32)
            rt.check_inputs(x_host, np.zeros(b, np.float32), cond)
            head.upload("x_t", x_host)
        null = rt.contract.null_batch(rt.null, cond)
        for name, value in {"t": np.full(b, t, np.float32), **cond, "guidance": np.float32([guidance]),
                            "coefs": coefs, **{rt.null_names[k]: v for k, v in null.items()}}.items():
            if name in head.buffers:
                head.upload(name, value)
        for name, _ in STEP_STATE:
            value = getattr(state, name, None)
            if not self._mine(value):
                if value is None:
                    self._zero(name, video_bytes)
                else:
                    head.upload(name, np.asarray(value, np.float32))
        for name in REF_INPUTS:                  # a new trajectory: nothing cached yet
            if cache.refs.get(name) is None:
                self._zero(name, int(np.prod(head.context.get_tensor_shape(name))) * 4)
        if Step(t, coefs).stochastic:
            head.upload("noise", noise)
        check_cuda(cudart.cudaStreamSynchronize(rt.stream), "cudaStreamSynchronize")   # host arrays may go
        self._run("head", head)
        check_cuda(cudart.cudaMemcpyAsync(self.stats.ctypes.data, head.buffers["stats"], self.stats.nbytes,
                                          cudart.cudaMemcpyKind(D2H), rt.stream), "download stats")
        check_cuda(cudart.cudaStreamSynchronize(rt.stream), "cudaStreamSynchronize")
        skip = cache.decide(self.stats)
        if not skip:
            self._run("tail", tail)
        mod_bytes = int(np.prod(head.out_shape("modulated"))) * 4
        hidden_bytes = int(np.prod(head.out_shape("residual"))) * 4
        self._copy("modulated_ref", "modulated", mod_bytes)
        if not skip:
            self._copy("residual_ref", "residual", hidden_bytes)
        cache.update_refs(skip, "device", "device", None if skip else "device")
        for src, dst in MOVES:
            self._copy(dst, src, video_bytes)
        rt.serial += 1
        self.serial = rt.serial
        handle = lambda name: TrtDeviceArray(rt, 0, video, rt.serial, [head.buffers[name]])   # noqa: E731
        for name, _ in STEP_STATE if state is not None else ():
            setattr(state, name, handle(name))
        return handle("x_t")

    @property
    def files(self) -> list:
        return [self.head.path, self.tail.path]

    def close(self) -> None:
        self.drop_graphs()
        for engine in (self.tail, self.head):
            engine.close()
