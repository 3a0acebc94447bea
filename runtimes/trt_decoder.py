"""The VAE decoder on TensorRT (no torch): the engines `vdit build` made of decoder.onnx (+ decoder-chunk.onnx)
behind decode.Decoder, whose latent scaling, temporal chunks, spatial tiles and blending stay as they are
(numpy on the host); only each graph call runs as an engine call. A frames-layout decoder's rows (latent
frames) go through the engine in slices of its profile's largest batch; a causal decoder's feature cache
goes back to the host between chunks (what decode.Decoder feeds the next chunk). It only loads: with no
engine for this export, GPU and TensorRT, it raises NoDecoderEngine, and `--runtime trt` decodes on ONNX
Runtime instead, saying so in one line (generate.video_decoder).
"""
from __future__ import annotations

import numpy as np

from vdit_deploy.decode import FRAMES, Decoder, read_decoder_meta
from vdit_deploy.errors import VditError
from vdit_deploy.export.variants import FP16, FP32
from vdit_deploy.runtimes.engine_cache import check_cuda, gpu_info, import_cudart, import_tensorrt, tensorrt_logger
from vdit_deploy.runtimes.trt_engine import D2H, _Engine


class NoDecoderEngine(VditError):
    """The export has a decoder but no engine of it for this precision, GPU and TensorRT."""


class TrtDecoder(Decoder):
    """decode(latents) -> (B, 3, F', H', W') in [-1, 1], each decoder graph an engine of `precision`."""

    def __init__(self, export_dir, precision: str = FP16, tile: int | None = None, cache_dir=None, device: int = 0):
        from vdit_deploy.runtimes.trt_build import decoder_precision

        self.gpu = gpu_info(device)
        self.trt, self.cudart = import_tensorrt(), import_cudart()
        check_cuda(self.cudart.cudaSetDevice(device), "cudaSetDevice")
        self.export, self.cache_dir = export_dir, cache_dir
        self.precision = decoder_precision(precision)
        self.logger = tensorrt_logger(self.trt)
        self.engines: list[_Engine] = []
        self.stream = None
        err, self.stream = self.cudart.cudaStreamCreateWithFlags(1)   # cudaStreamNonBlocking
        check_cuda(err, "cudaStreamCreate")
        try:
            super().__init__(export_dir, FP32, tile=tile)           # the fp32 graphs' metadata; engines below
        except BaseException:
            self.close()
            raise
        self.files = [e.path for e in self.engines]

    def session(self, file, providers=None, threads=None) -> _Engine:
        from vdit_deploy.runtimes.trt_build import decoder_axes, find_engine

        meta = read_decoder_meta(file)
        try:
            path = find_engine(self.export, meta.kind, self.precision, build=False, cache_dir=self.cache_dir).path
        except VditError as e:
            raise NoDecoderEngine(str(e)) from None
        engine = _Engine(self.trt, self.cudart, path, self.stream, self.logger, decoder_axes(meta))
        engine.order = [o["name"] for o in meta.io["outputs"]]      # the graph's output order: frames, cache...
        self.engines.append(engine)
        return engine

    def _run(self, engine: _Engine, feeds: dict) -> list:
        rows = len(feeds["z"])
        if self.meta.layout == FRAMES and rows > engine.max_batch:   # latent frames, a slice at a time
            step = engine.max_batch
            parts = [self._run(engine, {"z": feeds["z"][i:i + step]}) for i in range(0, rows, step)]
            return [np.concatenate(outs) for outs in zip(*parts)]
        engine.set_shapes({name: value.shape for name, value in feeds.items()})
        for name, value in feeds.items():
            engine.upload(name, value)
        engine.execute()
        outs = []
        for name in engine.order:
            out = np.empty(engine.out_shape(name), engine.dtypes[name])
            check_cuda(self.cudart.cudaMemcpyAsync(out.ctypes.data, engine.buffers[name], out.nbytes,
                                                   self.cudart.cudaMemcpyKind(D2H), self.stream), f"download {name}")
            outs.append(out)
        check_cuda(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return [o.astype(np.float32, copy=False) for o in outs]

    def describe(self) -> str:
        return f"{', '.join(p.name for p in self.files)} (TensorRT {self.precision} on {self.gpu.name})"

    def close(self) -> None:
        for engine in self.engines:
            engine.close()
        self.engines = []
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
