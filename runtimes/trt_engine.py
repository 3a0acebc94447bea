"""One deserialized TensorRT engine with its context, device buffers and CUDA graphs (cuda-python, no
torch), and a device array the runtime hands back between steps: what trt_runtime.py and its step
cache (trt_cache.py) share."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.runtimes.base import TensorSpec
from vdit_deploy.runtimes.engine_cache import check_cuda

H2D, D2H = 1, 2   # cudaMemcpyKind values (cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost)


class TrtDeviceArray:
    """The video after a step, still on the GPU; np.asarray waits for the stream and copies it out."""

    def __init__(self, runtime: "TrtRuntime", index: int, shape: tuple, serial: int, buffers=None):
        self.runtime, self.index, self.shape, self.serial = runtime, index, shape, serial
        self.buffers = buffers     # the ping-pong pair it lives in (None: the video's)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, dtype=None, copy=None):
        out = self.runtime._download(self)
        return out if dtype is None else out.astype(dtype, copy=False)


class _Engine:
    """One deserialized engine with its context and device buffers sized for the profile's largest
    shapes. `axes` names each input's dimensions (the export's I/O spec: "batch", "seq", ...)."""

    def __init__(self, trt, cudart, path: Path, stream, logger, axes: dict[str, list]):
        self.trt, self.cudart, self.path, self.stream, self.axes = trt, cudart, path, stream, axes
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise VditError(f"TensorRT could not load {path} (built by another TensorRT version? rebuild it)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.shapes = {n: tuple(self.engine.get_tensor_shape(n)) for n in names}   # -1: dynamic
        # profile 0's (min, max) of every dynamic input
        self.ranges = {n: tuple(tuple(d) for d in self.engine.get_tensor_profile_shape(n, 0))[::2]
                       for n in self.inputs if -1 in self.shapes[n]}
        first = next((n for n in self.ranges if self.shapes[n][0] == -1), None)
        if first is not None:
            self.min_batch, self.max_batch = self.ranges[first][0][0], self.ranges[first][1][0]
        else:
            first = self.shapes[self.inputs[0]]
            self.min_batch = self.max_batch = first[0] if first else 1
        self.current: dict[str, tuple] = {}
        self.set_shapes({n: hi for n, (_, hi) in self.ranges.items()})
        self.buffers = {}   # name -> device pointer, sized for the largest shapes
        for name in names:
            nbytes = max(int(np.prod(tuple(self.context.get_tensor_shape(name)))), 1) * self.dtypes[name].itemsize
            err, ptr = cudart.cudaMalloc(nbytes)
            check_cuda(err, f"cudaMalloc for {name}")
            self.buffers[name] = ptr
            check_cuda(cudart.cudaMemset(ptr, 0, nbytes), "cudaMemset")
            self.bind(name, ptr)

    @property
    def batch(self) -> int:
        return next((shape[0] for n, shape in self.current.items() if self.shapes[n][0] == -1), self.max_batch)

    def set_shapes(self, shapes: dict[str, tuple]) -> bool:
        """Give TensorRT the shape of each dynamic input in `shapes` (the others keep theirs), each
        checked against the profile first so a refusal names the axis. Returns whether any changed."""
        changed = False
        for name, shape in shapes.items():
            shape = tuple(int(d) for d in shape)
            if name not in self.ranges or self.current.get(name) == shape:
                continue
            lo, hi = self.ranges[name]
            for i, (a, d, b) in enumerate(zip(lo, shape, hi)):
                if not a <= d <= b:
                    named = self.axes.get(name) or []
                    axis = named[i] if i < len(named) else "batch" if i == 0 else f"axis {i}"
                    if axis == "batch":
                        raise VditError(f"batch {d} is outside the engine {self.path.name}'s profile "
                                        f"{a}..{b}; rebuild with `vdit build --batch MIN:OPT:MAX`")
                    raise VditError(f"{name} has {axis} = {d}, outside the engine {self.path.name}'s profile "
                                    f"{a}..{b}; rebuild with `vdit build --{axis} MIN:OPT:MAX`")
            if not self.context.set_input_shape(name, shape):
                raise VditError(f"TensorRT refused shape {shape} for input {name} of {self.path.name}")
            self.current[name] = shape
            changed = True
        return changed

    def set_batch(self, b: int) -> bool:
        """Every batched input at batch b, its other dims as they are (the largest, at first)."""
        return self.set_shapes({n: (b, *self.current[n][1:]) for n in self.ranges if self.shapes[n][0] == -1})

    def out_shape(self, name: str) -> tuple:
        return tuple(self.context.get_tensor_shape(name))

    def bind(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, ptr):
            raise VditError(f"TensorRT refused the device address of {name} in {self.path.name}")

    def upload(self, name: str, array: np.ndarray, ptr: int | None = None) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtypes[name])
        check_cuda(self.cudart.cudaMemcpyAsync(ptr or self.buffers[name], array.ctypes.data, array.nbytes,
                                               self.cudart.cudaMemcpyKind(H2D), self.stream), f"upload {name}")

    def execute(self) -> None:
        if not self.context.execute_async_v3(int(self.stream)):
            raise VditError(f"TensorRT failed to run {self.path.name}")

    def specs(self, names) -> list[TensorSpec]:
        def dims(n):
            named = self.axes.get(n) or ["batch"]
            return tuple((named[i] if i < len(named) else "batch") if d == -1 else d
                         for i, d in enumerate(self.shapes[n]))
        return [TensorSpec(n, dims(n), self.dtypes[n].name) for n in names]

    def close(self) -> None:
        for ptr in self.buffers.values():
            self.cudart.cudaFree(ptr)
        self.buffers = {}
        self.context = self.engine = None
