"""Native TensorRT runtime: the whole sampling loop on the GPU, no torch (cuda-python for CUDA).

The fused step engine (step.onnx: guidance + affine update inside) runs with the video on the device:
    x[0] --step--> x[1] --step--> x[0] ...      two device buffers, ping-pong
and so does a multistep solver's state (x0_prev <-> x0, corr <-> corr_next: two more pairs that swap
with the video, inside the same CUDA graphs).
Per step the host uploads t, the conditioning (the model contract's inputs: a label, or text
embeddings), guidance and coefs and, on stochastic steps, the noise (drawn on the host by sampling.py
so every runtime sees the same values); the null conditioning (null_<name>, the export's
null_cond.safetensors repeated over the batch) only when the batch or a named axis changes. Every
dynamic axis of every input (the batch, a text model's token count) is set with set_input_shape
from the arrays given; a change of shapes drops the captured graphs. The first step of each
ping-pong direction runs eagerly (TensorRT does its shape-dependent setup there); then each
direction is captured once as a CUDA graph and replayed for every later step, so a step costs one
graph launch plus the uploads. Device buffers are allocated once, for the profile's largest shapes.
An engine that cannot be captured (some plugins, DLA) runs eagerly from then on (`_capture_graph`).
cuda-python 11.8 to 13.x and TensorRT 10.x/11.x: tests/test_trt_api.py runs this file against strict
fakes of those APIs (conformance and control flow, never numerics).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.export.variants import FP16
from vdit_deploy.runtimes.base import Runtime, TensorSpec
from vdit_deploy.runtimes.trt_engine import H2D, D2H, TrtDeviceArray, _Engine
from vdit_deploy.runtimes.engine_cache import (check_cuda, gpu_info, import_cudart, import_tensorrt,
                                               tensorrt_logger)



class TrtRuntime(Runtime):
    name = "trt"

    def __init__(self, artifact, precision: str = FP16, cuda_graph: bool = True, cache_dir=None, device: int = 0):
        """Loads engines `vdit build` made (trt_build.ensure_engine); it never builds one itself."""
        from vdit_deploy.contract import load_null
        from vdit_deploy.export.metadata import NULL_PREFIX, STEP_STATE, find_onnx, read_metadata
        from vdit_deploy.export.variants import STEP, check_precision

        self.gpu = gpu_info(device)              # one-line errors: no cuda-python / no GPU ...
        trt, cudart = import_tensorrt(), import_cudart()   # ... / no TensorRT
        check_cuda(cudart.cudaSetDevice(device), "cudaSetDevice")
        self.trt, self.cudart, self.device = trt, cudart, self.gpu.name
        self.precision = check_precision(self.name, precision)
        self.export = Path(artifact)
        if self.export.suffix in (".onnx", ".engine"):
            raise VditError("--runtime trt takes an export directory (engines are cached in DIR/engines)")
        meta = read_metadata(find_onnx(self.export, STEP))
        self.contract = meta.contract
        self.null = load_null(self.contract, self.export)
        self.null_names = {name: NULL_PREFIX + name for name in self.contract.names}
        self.axes = {spec["name"]: spec["shape"] for io in (meta.io["inputs"], meta.io["outputs"]) for spec in io}
        self.cache_dir = cache_dir
        self.logger = tensorrt_logger(trt)   # the builder's too
        err, self.stream = cudart.cudaStreamCreateWithFlags(1)   # cudaStreamNonBlocking
        check_cuda(err, "cudaStreamCreate")
        self.step_engine = _Engine(trt, cudart, self._engine_path(STEP), self.stream, self.logger, self.axes)
        self._denoiser, self._cache = None, None
        self._null_shapes = None              # the shapes the null conditioning was last uploaded at
        engine = self.step_engine
        want = {"x_t", "noise", *self.contract.names, *self.null_names.values()}
        if not want <= set(engine.inputs) or "x_prev" not in engine.outputs:
            raise VditError(f"{engine.path.name} is not a step engine of this export's contract "
                            f"({self.contract.describe_cond()}): inputs {engine.inputs}, outputs {engine.outputs}; "
                            "rebuild it with `vdit build`")
        # ping-pong video buffers: the engine's own x_t and x_prev allocations, swapped every step
        self.x = [engine.buffers["x_t"], engine.buffers["x_prev"]]
        # the solver state's pairs (input, output, [buffers]); an engine from an older export has none
        self.state_buffers = [(i, o, [engine.buffers[i], engine.buffers[o]])
                              for i, o in STEP_STATE if i in engine.buffers]
        self.parity, self.serial = 0, 0
        self.cuda_graph, self.graphs, self.warm = cuda_graph, {}, set()
        self.graph_error = ""
        # pinned staging for the noise: the host fills it while the GPU runs the previous step
        self.video_elements = int(np.prod(self.contract.latent))
        nbytes = engine.max_batch * self.video_elements * 4
        err, self.pinned = cudart.cudaMallocHost(nbytes)
        check_cuda(err, "cudaMallocHost")
        self.pinned_noise = np.ctypeslib.as_array((ctypes.c_float * (nbytes // 4)).from_address(self.pinned))
        err, self.uploaded = cudart.cudaEventCreateWithFlags(2)   # cudaEventDisableTiming
        check_cuda(err, "cudaEventCreate")

    def _engine_path(self, kind: str) -> Path:
        from vdit_deploy.runtimes.trt_build import find_engine

        return find_engine(self.export, kind, self.precision, build=False, cache_dir=self.cache_dir).path

    # ---- Runtime interface ----------------------------------------------------------------------
    @property
    def denoiser(self) -> _Engine:
        if self._denoiser is None:   # only loaded when someone calls denoise()
            from vdit_deploy.export.variants import DENOISER

            self._denoiser = _Engine(self.trt, self.cudart, self._engine_path(DENOISER), self.stream, self.logger,
                                     self.axes)
        return self._denoiser

    @property
    def files(self):
        return [e.path for e in (self.step_engine, self._denoiser) if e is not None] + \
            (self._cache.files if self._cache else [])

    @property
    def batch_range(self):
        return self.denoiser.min_batch, self.denoiser.max_batch

    @property
    def inputs(self):
        return self.step_engine.specs(self.step_engine.inputs)

    @property
    def outputs(self):
        return self.step_engine.specs(self.step_engine.outputs)

    def denoise(self, x_t, t, cond):
        x_t, t = np.asarray(x_t, np.float32), np.asarray(t)
        cond = self.check_inputs(x_t, t, cond)
        engine = self.denoiser
        feeds = {"x_t": x_t, "t": t, **cond}
        engine.set_shapes({name: value.shape for name, value in feeds.items()})
        for name, value in feeds.items():
            engine.upload(name, value)
        engine.execute()
        out_name = engine.outputs[0]
        out = np.empty(engine.out_shape(out_name), engine.dtypes[out_name])
        check_cuda(self.cudart.cudaMemcpyAsync(out.ctypes.data, engine.buffers[out_name], out.nbytes,
                                               self.cudart.cudaMemcpyKind(D2H), self.stream), f"download {out_name}")
        check_cuda(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return out.astype(np.float32, copy=False)

    def step(self, x_t, t: int, cond, guidance: float, coefs, noise, state=None):
        """One guided step; returns a TrtDeviceArray (np.asarray copies it to the host). A multistep
        solver's state stays in the engine's buffers; `state` holds handles to them."""
        from vdit_deploy.samplers import Step

        engine, cudart = self.step_engine, self.cudart
        if state is not None and not self.state_buffers:
            raise VditError(f"{engine.path.name} was built from a step.onnx exported before the multistep samplers "
                            "(no solver state inputs); re-export with `vdit export` to sample with dpm++ or unipc")
        coefs = np.asarray(coefs, np.float32)
        stochastic = Step(t, coefs).stochastic
        b = x_t.shape[0]
        cond = self.contract.check_cond(cond, b)
        video = (b, *self.contract.latent)
        shapes = {name: video for name in ("x_t", "noise", *(i for i, _, _ in self.state_buffers))}
        shapes.update({"t": (b,), **{n: a.shape for n, a in cond.items()},
                       **{self.null_names[n]: a.shape for n, a in cond.items()}})
        null_shapes = {n: a.shape for n, a in cond.items()}
        # the runtime's own null conditioning, constant per shape: repeated (and checked against the
        # prompt's length) only when the shapes change
        null = self.contract.null_batch(self.null, cond) if null_shapes != self._null_shapes else None
        if engine.set_shapes(shapes):
            self._drop_graphs()   # graphs hold the old shapes
        src, dst = self.x[self.parity], self.x[1 - self.parity]
        on_device = isinstance(x_t, TrtDeviceArray) and x_t.runtime is self and x_t.serial == self.serial
        if not on_device:   # first step (x_T from the host) or a video from elsewhere
            x_host = np.asarray(x_t, np.float32)
            self.check_inputs(x_host, np.zeros(b, np.float32), cond)
            engine.upload("x_t", x_host, src)
            check_cuda(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")   # x_host may go away
        if null is not None:
            for name, value in null.items():
                engine.upload(self.null_names[name], value)
            self._null_shapes = null_shapes
        scalars = {"t": np.full(b, t, np.float32), **cond, "guidance": np.float32([guidance]), "coefs": coefs}
        for name, value in scalars.items():
            if name in engine.buffers:
                engine.upload(name, value)
        for name, _, buffers in self.state_buffers if state is not None else ():
            value = getattr(state, name)
            if isinstance(value, TrtDeviceArray) and value.runtime is self and value.serial == self.serial:
                continue                      # the previous step's output, already in place
            if value is None:                 # a new trajectory: the state starts at zero
                check_cuda(cudart.cudaMemsetAsync(buffers[self.parity], 0, b * self.video_elements * 4,
                                                  self.stream), "cudaMemsetAsync")
            else:
                engine.upload(name, np.asarray(value, np.float32), buffers[self.parity])
                check_cuda(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        if stochastic:   # sigma or a learned variance: this step's noise
            check_cuda(cudart.cudaEventSynchronize(self.uploaded), "cudaEventSynchronize")   # staging free again
            n = noise.size
            self.pinned_noise[:n] = np.asarray(noise, np.float32).reshape(-1)
            check_cuda(cudart.cudaMemcpyAsync(engine.buffers["noise"], self.pinned, n * 4,
                                              cudart.cudaMemcpyKind(H2D), self.stream), "upload noise")
            check_cuda(cudart.cudaEventRecord(self.uploaded, self.stream), "cudaEventRecord")
        # (a deterministic step: the engine multiplies the stale, finite noise buffer by 0)
        self._run(self.parity, src, dst)
        self.parity ^= 1
        self.serial += 1
        for name, _, buffers in self.state_buffers if state is not None else ():
            setattr(state, name, TrtDeviceArray(self, self.parity, video, self.serial, buffers))
        return TrtDeviceArray(self, self.parity, video, self.serial)

    def cached_step(self, x_t, t: int, cond, guidance: float, coefs, noise, state=None, cache=None):
        """A step of step caching (runtimes/trt_cache.py): the step-head engine, the step-tail engine
        unless `cache` skips it; engines `vdit build` made from an export with --cache-split."""
        if self._cache is None:
            from vdit_deploy.runtimes.trt_cache import TrtCache
            self._cache = TrtCache(self)
        return self._cache.step(x_t, t, cond, guidance, coefs, noise, state, cache)

    def _run(self, parity: int, src: int, dst: int) -> None:
        engine, cudart = self.step_engine, self.cudart
        if parity in self.graphs:
            check_cuda(cudart.cudaGraphLaunch(self.graphs[parity], self.stream), "cudaGraphLaunch")
            return
        engine.bind("x_t", src)
        engine.bind("x_prev", dst)
        for name, out, buffers in self.state_buffers:     # the solver state swaps with the video
            engine.bind(name, buffers[parity])
            engine.bind(out, buffers[1 - parity])
        if self.cuda_graph and parity in self.warm:
            graph_exec = self._capture_graph(engine.execute)
            if graph_exec is not None:
                self.graphs[parity] = graph_exec
                check_cuda(cudart.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")
                return
        engine.execute()          # eager: the first run per direction warms TensorRT up; also the fall-back
        self.warm.add(parity)

    def _capture_graph(self, launch) -> object | None:
        """Capture what `launch()` enqueues on the stream as an executable CUDA graph. When that
        fails (an engine that cannot be captured: some plugins, DLA) the capture is still ended and
        the graph destroyed, so the stream is usable again; returns None and the runtime stays eager."""
        cudart = self.cudart
        graph = None
        try:
            check_cuda(cudart.cudaStreamBeginCapture(
                self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture")
            try:
                launch()
            finally:   # always leave capture mode, even when launch() failed
                err, graph = cudart.cudaStreamEndCapture(self.stream)
            check_cuda(err, "cudaStreamEndCapture")
            # WithFlags: one signature from cuda-python 11.8 to 13.x (cudaGraphInstantiate's changed in 12.0)
            err, graph_exec = cudart.cudaGraphInstantiateWithFlags(graph, 0)
            check_cuda(err, "cudaGraphInstantiateWithFlags")
            return graph_exec
        except VditError as e:
            self.cuda_graph, self.graph_error = False, str(e)
            cudart.cudaGetLastError()   # clear the error the failed capture left
            return None
        finally:
            if graph is not None:      # the executable graph (if any) does not need it
                cudart.cudaGraphDestroy(graph)

    def _download(self, array: TrtDeviceArray) -> np.ndarray:
        if array.serial != self.serial:
            raise VditError("this device video was overwritten by later steps; copy it out before stepping on")
        out = np.empty(array.shape, np.float32)
        check_cuda(self.cudart.cudaMemcpyAsync(out.ctypes.data, (array.buffers or self.x)[array.index], out.nbytes,
                                               self.cudart.cudaMemcpyKind(D2H), self.stream), "download video")
        check_cuda(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return out

    def _drop_graphs(self) -> None:
        for graph_exec in self.graphs.values():
            self.cudart.cudaGraphExecDestroy(graph_exec)
        self.graphs, self.warm = {}, set()

    def describe(self) -> str:
        graph = "CUDA graph" if self.cuda_graph else f"no CUDA graph{': ' + self.graph_error if self.graph_error else ''}"
        return f"trt:{self.precision} on {self.gpu.name} ({self.step_engine.path.name}, {graph})"

    def close(self) -> None:
        if getattr(self, "stream", None) is None:
            return
        self.cudart.cudaStreamSynchronize(self.stream)
        self._drop_graphs()
        if self._cache is not None:
            self._cache.close()
        for engine in (self.step_engine, self._denoiser):
            if engine is not None:
                engine.close()
        self.cudart.cudaFreeHost(self.pinned)
        self.cudart.cudaEventDestroy(self.uploaded)
        self.cudart.cudaStreamDestroy(self.stream)
        self.stream = None
