"""One ONNX graph -> one serialized TensorRT engine (TensorRT Python API, 10.x and 11.x): which graph a
precision compiles, the network and builder config, the optimization profile, fp32-pinned layers, the
timing cache, implicit-INT8 calibration on older TensorRT, and build progress. Which engines an export
needs and when a cached one is reused: trt_build.py.

Precision, and how TensorRT versions differ (the build path is chosen by capability: TensorRT 11
has no BuilderFlag.FP16, see `strongly_typed_only`):
  fp32  the fp32 graph; TF32 off (TensorRT enables it by default, 11.x too) so "fp32" means fp32.
  fp16  TensorRT 10: the fp32 graph with BuilderFlag.FP16 (weak typing), LayerNorm / Softmax / reduce
        / pow layers pinned to fp32 with OBEY_PRECISION_CONSTRAINTS (fp16 overflows in their sums).
        TensorRT 11 removed weak typing: it builds the fp16 graph (<kind>.fp16.onnx, made by
        `vdit calibrate fp16`) as a strongly typed network, which carries its own fp32 islands.
  int8  the Q/DQ graph (<kind>.int8-qdq.onnx, from `vdit calibrate int8 --mode qdq`): explicit quantization, the only
        INT8 path of TensorRT >= 10.1 that is not deprecated and the only one in 11.x. TensorRT 10.x
        (10.3 on JetPack 6) also takes implicit INT8 with a calibrator: see `entropy_calibrator`.
  best  the int8 graph where the export has one, else fp16, with every precision flag on (10.x).
Supported: TensorRT 10.x (10.3 is JetPack 6) and 11.x; import_tensorrt refuses 8.x in one line.
tests/test_trt_api.py runs this file against strict fakes generated from the recorded APIs of 10.3,
10.13, 10.16 and 11.4 (API conformance and control flow only, never numerics).
Older TensorRT (JetPack 5: TRT 8.5 / 8.6, unsupported), for readers porting this file:
  - create_network() needs 1 << NetworkDefinitionCreationFlag.EXPLICIT_BATCH (implicit by default in 10).
  - set_memory_pool_limit(WORKSPACE, n) exists from 8.4; before it, config.max_workspace_size = n.
  - build_serialized_network exists from 8.0; builder.build_engine (returns an ICudaEngine) is gone in 10.
  - No IProgressMonitor (10.0+) and no builder_optimization_level before 8.6: builds are silent.
  - Strongly typed networks arrive in 9.1; implicit INT8 calibrators are deprecated in 10.1, removed in 11.
  - Execution: execute_async_v3 + set_tensor_address from 8.5; 8.4 and older use bindings lists.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.export.variants import BEST, FP16, FP32, INT8, find_variant, runtime_graph, variant_file
from vdit_deploy.files import atomic_path
from vdit_deploy.runtimes.engine_cache import (EngineProfile, check_cuda, import_cudart, import_tensorrt,
                                               tensorrt_logger)


def strongly_typed_only(trt) -> bool:
    """TensorRT 11 removed the weak-typing precision flags (BuilderFlag.FP16/INT8)."""
    return not hasattr(trt.BuilderFlag, "FP16")


def onnx_for(export: Path, kind: str, precision: str, strongly_typed: bool) -> Path:
    """The ONNX graph a build of `precision` compiles (see the module docstring)."""
    from vdit_deploy.export.metadata import find_onnx

    export = Path(export)
    if export.is_file():
        return export
    graph = runtime_graph("trt", precision)   # int8 and best: the Q/DQ graph, not ONNX Runtime's dynamic one
    if precision == BEST and find_variant(export, kind, graph) is None:
        graph = FP16
    if graph == FP16 and not strongly_typed:
        graph = FP32                          # weak typing: the fp32 graph with BuilderFlag.FP16
    if graph == FP16 and find_variant(export, kind, FP16) is None:
        raise VditError(f"TensorRT 11 builds fp16 only from an fp16 graph (strong typing) and {export} has no "
                        f"{variant_file(kind, FP16)}; export an fp16 variant, or pip install 'tensorrt-cu12<11'")
    return find_onnx(export, kind, graph)


# ---- calibration data (implicit INT8 on older TensorRT) -------------------------------------------
def calibration_batches(source, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches {input name: array} from a calibration set:
      - a directory of NAME.npy files, each stacking samples of input NAME on axis 0 (cut into batches),
      - a directory of .npz files, each one batch keyed by input name,
      - a callable or iterable yielding such dicts."""
    if callable(source):
        source = source()
    if not isinstance(source, (str, Path)):
        yield from source
        return
    root = Path(source)
    if not root.is_dir():
        raise VditError(f"calibration set {root} is not a directory")
    npz = sorted(root.glob("*.npz"))
    if npz:
        for file in npz:
            with np.load(file) as data:
                yield {name: data[name] for name in data.files}
        return
    arrays = {p.stem: np.load(p, mmap_mode="r") for p in sorted(root.glob("*.npy"))}
    if not arrays:
        raise VditError(f"calibration set {root} has no .npy or .npz files")
    n = {len(a) for a in arrays.values()}
    if len(n) != 1:
        raise VditError(f"calibration arrays in {root} have different sample counts: "
                        + ", ".join(f"{k}={len(a)}" for k, a in arrays.items()))
    total = n.pop()
    for start in range(0, total - batch_size + 1, batch_size):   # whole batches only: TRT wants a fixed size
        yield {name: np.ascontiguousarray(a[start:start + batch_size]) for name, a in arrays.items()}


def entropy_calibrator(trt, batches: Iterable[dict], batch_size: int, cache_path: Path):
    """An IInt8EntropyCalibrator2 feeding `batches` from device memory and keeping TensorRT's
    calibration cache at `cache_path` (reused by later builds, e.g. on the Jetson itself).
    Implicit INT8: TensorRT 10.x here (deprecated in 10.1, removed in 11; 8.x had it too)."""
    cudart = import_cudart()

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = iter(batches)
            self.device: dict[str, tuple[int, int]] = {}   # name -> (pointer, bytes)
            self.reused = False                              # TensorRT was handed an existing cache

        def get_batch_size(self):
            return batch_size

        def get_batch(self, names):
            try:
                batch = next(self.batches)
            except StopIteration:
                return None
            pointers = []
            for name in names:
                array = np.ascontiguousarray(batch[name])
                ptr, size = self.device.get(name, (0, 0))
                if size < array.nbytes:
                    if ptr:
                        cudart.cudaFree(ptr)
                    err, ptr = cudart.cudaMalloc(array.nbytes)
                    check_cuda(err, "cudaMalloc")
                    self.device[name] = (ptr, array.nbytes)
                check_cuda(cudart.cudaMemcpy(ptr, array.ctypes.data, array.nbytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyHostToDevice), "cudaMemcpy")
                pointers.append(int(ptr))
            return pointers

        def read_calibration_cache(self):
            if not cache_path.is_file():
                return None
            self.reused = True
            return cache_path.read_bytes()

        def write_calibration_cache(self, cache):
            with atomic_path(cache_path) as tmp:
                tmp.write_bytes(bytes(cache))

        def __del__(self):
            for ptr, _ in self.device.values():
                cudart.cudaFree(ptr)

    return EntropyCalibrator()


# ---- build progress ---------------------------------------------------------------------------------
def progress_monitor(trt):
    """tqdm bars for the builder's phases (TensorRT >= 10.0); None where the API is missing."""
    if not hasattr(trt, "IProgressMonitor"):
        return None
    from tqdm import tqdm

    class Bars(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars: dict[str, tqdm] = {}
            self.depth: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            depth = self.depth.get(parent_phase, -1) + 1 if parent_phase else 0
            self.depth[phase_name] = depth
            self.bars[phase_name] = tqdm(total=num_steps, desc="  " * depth + phase_name, position=depth,
                                         leave=depth == 0, unit="step")

        def step_complete(self, phase_name, step):
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.n = step + 1
                bar.refresh()
            return True   # False would cancel the build

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return Bars()


# ---- the build --------------------------------------------------------------------------------------
# Layers whose fp16 sums overflow or lose the small differences diffusion needs: kept fp32 under FP16.
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")


@dataclass(frozen=True)
class BuildOptions:
    workspace_mb: int | None = None        # memory-pool limit for tactics' scratch space
    opt_level: int | None = None           # builder_optimization_level 0..5 (TensorRT default 3)
    dla_core: int | None = None            # Jetson DLA core, with GPU fallback
    target: str | None = None              # deployment profile name (recorded in the manifest)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def pin_fp32_layers(trt, network) -> int:
    """Set fp32 precision on overflow-prone layers (and pow: x**2 in decomposed LayerNorms) whose
    outputs are floating point (a REDUCE over shape integers stays integer)."""
    types = {getattr(trt.LayerType, name) for name in FP32_LAYER_TYPES if hasattr(trt.LayerType, name)}
    floats = {trt.float32, trt.float16}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)   # a plain ILayer: cast to reach the element-wise op (as polygraphy does)
        if layer.type == trt.LayerType.ELEMENTWISE:
            layer.__class__ = trt.IElementWiseLayer
        is_pow = layer.type == trt.LayerType.ELEMENTWISE and layer.op == trt.ElementWiseOperation.POW
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if (layer.type in types or is_pow) and all(out.dtype in floats for out in outputs):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def use_timing_cache(config, path: Path, log: Callable[[str], None]):
    """Give the builder the timing cache at `path` when it was made here (same GPU and TensorRT),
    else a new one: a foreign cache (a desktop's on a Jetson) would mislead tactic selection."""
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    log(f"note: timing cache {path} was made on another GPU or TensorRT version; starting a new one")
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise VditError("TensorRT could not create a timing cache")
    return cache


def build_engine(onnx_path: Path, precision: str, profile: EngineProfile, options: BuildOptions = BuildOptions(),
                 timing_cache: Path | None = None, calibration=None, progress: bool = True,
                 log: Callable[[str], None] = print, axis_names: dict | None = None) -> tuple[bytes, dict]:
    """Parse `onnx_path`, build a serialized engine; returns (engine bytes, facts for the manifest).
    The export's I/O spec names each dynamic axis (or `axis_names`: input -> per-dimension names, a
    decoder's), so `profile` gives it its range."""
    import onnx

    from vdit_deploy.runtimes.cpu_isa import tensorrt_refusal
    from vdit_deploy.runtimes.qdq_bins import bins_note, float_note

    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    if refusal := tensorrt_refusal(props, onnx_path.name):
        raise VditError(refusal)
    for note in (bins_note(props, onnx_path.name), float_note(props, onnx_path.name, "TensorRT")):
        if note:
            log(note)
    if axis_names is None:
        from vdit_deploy.export.metadata import read_metadata

        io = read_metadata(onnx_path).io
        axis_names = {spec["name"]: spec["shape"] for spec in io["inputs"]}
    trt = import_tensorrt()
    logger = tensorrt_logger(trt)
    builder = trt.Builder(logger)
    strong = strongly_typed_only(trt)   # 10.x builds Q/DQ graphs weakly typed, with the flags below
    flags = 0
    if strong:   # 11.x: every network is strongly typed; the flag says so explicitly
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):   # parse_from_file finds external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise VditError(f"TensorRT could not parse {onnx_path}: {errors or 'unknown error'}")

    config = builder.create_builder_config()
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    shapes = profile.shapes(inputs, axis_names)
    opt_profile = None
    if any(-1 in shape for shape in inputs.values()):
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            opt_profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(opt_profile) < 0:
            raise VditError(f"TensorRT refused the optimization profile {shapes} for {onnx_path.name}")
    elif not profile.batch.is_fixed or any(s[0] != profile.batch.min for n, s in inputs.items() if s):
        log(f"note: {onnx_path.name} has static shapes {inputs}; the batch profile {profile} does not apply")

    pinned = 0
    calibrator = None
    if precision == FP32:   # every TensorRT version enables TF32 by default
        config.clear_flag(trt.BuilderFlag.TF32)
    if not strong:   # weak typing (TensorRT <= 10): precision comes from builder flags
        if precision in (FP16, INT8, BEST):
            config.set_flag(trt.BuilderFlag.FP16)     # int8 graphs keep their unquantized parts in fp16
        if precision in (INT8, BEST):
            config.set_flag(trt.BuilderFlag.INT8)
        if precision in (FP16, BEST):
            pinned = pin_fp32_layers(trt, network)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        if calibration is not None:                   # implicit INT8 (TensorRT 10.x, no Q/DQ in the graph)
            calib_cache = (timing_cache.parent if timing_cache else onnx_path.parent) / f"{onnx_path.stem}.calib.cache"
            calibrator = entropy_calibrator(trt, calibration_batches(calibration, profile.batch.opt),
                                            profile.batch.opt, calib_cache)
            config.int8_calibrator = calibrator
            if opt_profile is not None and not config.set_calibration_profile(opt_profile):   # opt shapes
                raise VditError(f"TensorRT refused the calibration profile for {onnx_path.name}")
    elif calibration is not None:
        raise VditError("TensorRT 11 has no implicit INT8 calibration: build the Q/DQ graph from `vdit calibrate`")

    if options.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.opt_level is not None:
        config.builder_optimization_level = options.opt_level
    dla_fallback: list[str] = []
    if options.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        dla_fallback = [network.get_layer(i).name for i in range(network.num_layers)
                        if not config.can_run_on_DLA(network.get_layer(i))]
        log(f"DLA core {options.dla_core}: {len(dla_fallback)}/{network.num_layers} layers fall back to the GPU")

    # tactic timings survive between builds: rebuilds take seconds, not minutes
    cache = use_timing_cache(config, timing_cache, log) if timing_cache is not None else None
    if progress and (monitor := progress_monitor(trt)) is not None:
        config.progress_monitor = monitor

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise VditError(f"TensorRT failed to build {onnx_path.name} at {precision} (see the log above; "
                        f"a larger --workspace or a smaller --batch may help)")
    if cache is not None:
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(bytes(cache.serialize()))
    facts = {"onnx": onnx_path.name, "build_seconds": round(seconds, 2), "fp32_pinned_layers": pinned,
             "strongly_typed": bool(strong), "layers": network.num_layers,
             "inputs": {name: [list(s) for s in shape] for name, shape in shapes.items()}}
    if options.dla_core is not None:
        facts["dla_gpu_fallback_layers"] = dla_fallback
    if calibrator is not None:
        facts["calibration_cache"] = str(calib_cache)
        facts["calibration_cache_reused"] = calibrator.reused
    return bytes(serialized), facts
