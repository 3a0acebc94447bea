"""ONNX Runtime backend: samples from an export directory with no torch installed.

denoise() runs denoiser.onnx; step() runs the fused step.onnx (guidance + update in the graph) when
the export has one (step.fp16.onnx / step.int8-qdq.onnx from `vdit calibrate` for those precisions).
--precision names the graph (export/variants.py); int8 is the dynamic one, denoiser.int8-dynamic.onnx.
On CUDA/TensorRT the step outputs (the video and a multistep solver's state) stay on the device as
OrtValues bound with IO binding, and the next step consumes them in place: per step the host copies
only noise and scalars.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from vdit_deploy.contract import load_null
from vdit_deploy.samplers import SolverState, apply_step
from vdit_deploy.errors import VditError
from vdit_deploy.export.metadata import NULL_PREFIX, STEP_STATE, check_variant_complete, find_onnx, read_metadata
from vdit_deploy.export.variants import (DENOISER, FP16, FP32, INT8_QDQ, STEP, find_variant, runtime_graph, variant_file,
                                         with_data)
from vdit_deploy.runtimes.base import Runtime, TensorSpec

# Short names accepted for providers; the default order is the first three where available.
PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
             "cpu": "CPUExecutionProvider"}
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
              "tensor(int64)": np.int64}


class DeviceArray:
    """A video that stays on the accelerator between steps (an OrtValue); np.asarray copies it out."""

    def __init__(self, value):
        self.value = value

    @property
    def shape(self) -> tuple:
        return tuple(self.value.shape())

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, dtype=None, copy=None):
        out = self.value.numpy()
        return out if dtype is None else out.astype(dtype)


# CUDA EP settings: fp32 means fp32 (TF32 matmuls off, as in PyTorch); cuDNN picks its fastest algorithms.
CUDA_OPTIONS = {"use_tf32": "0", "cudnn_conv_algo_search": "EXHAUSTIVE"}


def resolve_providers(providers, options: dict | None = None) -> list:
    """Short or full provider names -> what InferenceSession takes: (name, options) pairs, CUDA with
    CUDA_OPTIONS, any provider with `options[name]` (e.g. the TensorRT EP's engine cache).
    onnxruntime-gpu links CUDA/cuDNN dynamically: preload_dlls() finds them in the nvidia-* wheels
    (PyTorch's CUDA wheels bring the same ones), so no LD_LIBRARY_PATH is needed."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        names = [p for p in PROVIDERS.values() if p in available]
    else:
        names = [PROVIDERS.get(p.lower(), p) if isinstance(p, str) else p for p in providers]
    for name in names:
        if name not in available:
            raise VditError(f"ONNX Runtime provider {name} is not available here (available: "
                            f"{', '.join(available)}); for CUDA/TensorRT install onnxruntime-gpu")
    if PROVIDERS["cuda"] in names and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:   # libraries elsewhere (LD_LIBRARY_PATH, JetPack): the session says if not found
            pass
    options = {PROVIDERS["cuda"]: CUDA_OPTIONS, **(options or {})}
    return [(name, options[name]) if name in options else name for name in names]


def _without_qdq_fusion(options):
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return options


class _Graph:
    """One ONNX file: its metadata, session and the input dtypes it wants."""

    def __init__(self, path: Path, kind: str, providers: list[str], options):
        """options: SessionOptions, or a callable that makes them (a graph with per-bin scales needs
        one per session)."""
        self.path, self.meta = path, read_metadata(path)
        if self.meta.kind != kind:
            raise VditError(f"{path} is a vdit {self.meta.kind} graph, expected a {kind} graph")
        make = options if callable(options) else (lambda: options)
        self.session = self._open(path, make(), providers)
        # A Q/DQ graph with full-range int8 weights (made for TensorRT, VNNI or arm64) on a CPU whose fused
        # u8 x s8 kernels saturate (runtimes/cpu_isa.py): run its Q/DQ pairs unfused instead, the
        # graph's own arithmetic in float (exact; the int8 kernels would not be faster on such a CPU).
        self.unfused = self.meta.precision == INT8_QDQ and self._saturates()
        if self.unfused:
            fused = make
            make = lambda: _without_qdq_fusion(fused())
            self.session = self._open(path, make(), providers)
        # per-timestep-bin Q/DQ scales (calibration/int8_bins.py): one session per bin, same file
        self.bins = self._bin_sessions(path, make, providers)
        # the first, noisiest steps in float (qdq_bins.FLOAT_KEY): the export's fp32 graph of this kind
        self.float_above, self.float_graph = self._float_graph(path, kind, providers, make)
        self.dtypes = {i.name: ORT_DTYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output = self.output_names[0]
        self.lo, self.hi = self.meta.batch_range()
        self.on_device = self.session.get_providers()[0] != PROVIDERS["cpu"]

    @staticmethod
    def _open(path, options, providers, overrides=None):
        import onnxruntime as ort

        for name, value in (overrides or {}).items():
            options.add_initializer(name, value)
        try:
            return ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:   # onnxruntime raises its own Fail / InvalidGraph types
            raise VditError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}") from None

    def _bin_sessions(self, path, make, providers):
        """(edges, [session per bin]) of a graph with per-bin Q/DQ scales, None for one set of scales.
        Each bin's session overrides the file's initializers with its bin's (OrtValues kept alive here)."""
        from vdit_deploy.runtimes.qdq_bins import read_bins

        bins = read_bins(self.session.get_modelmeta().custom_metadata_map, str(path))
        if bins is None:
            return None
        import onnxruntime as ort

        edges, tables = bins
        self._bin_values = [{k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for k, a in t.items()}
                            for t in tables]
        return edges, [self._open(path, make(), providers, values) for values in self._bin_values]

    def _float_graph(self, path, kind, providers, make):
        """(t_f, the fp32 _Graph beside this INT8 one) for a graph whose calls at t >= t_f run in float,
        else (None, None)."""
        from vdit_deploy.runtimes.qdq_bins import read_float_above

        t_f = read_float_above(self.session.get_modelmeta().custom_metadata_map, str(path))
        if t_f is None:
            return None, None
        fp32 = find_variant(path.parent, kind, FP32)
        if fp32 is None:
            raise VditError(f"{path.name} runs its first steps (t >= {t_f:g}) in float: it needs the export's "
                            f"{variant_file(kind, FP32)} beside it")
        return t_f, _Graph(fp32, kind, providers, make)

    def session_for(self, t) -> "object":
        """The session that runs a call at timesteps t: the fp32 graph's above float_above, its bin's, or
        the graph's one."""
        if t is not None and self.float_above is not None:
            high = np.asarray(t).reshape(-1) >= self.float_above
            if high.all():
                return self.float_graph.session
            if high.any():
                raise VditError(f"{self.path.name} runs calls at t >= {self.float_above:g} in float: one call's "
                                f"rows must all be above or all below (t = {np.unique(t).tolist()})")
        if self.bins is None or t is None:
            return self.session
        from vdit_deploy.runtimes.qdq_bins import bin_of

        index = np.unique(bin_of(np.asarray(t).reshape(-1), self.bins[0]))
        if len(index) != 1:
            raise VditError(f"{self.path.name} has per-timestep-bin scales: one call's rows must share a bin "
                            f"(t = {np.unique(t).tolist()})")
        return self.bins[1][int(index[0])]

    def check_batch(self, b: int) -> None:
        if not self.lo <= b <= self.hi:
            have = f"exactly {self.lo}" if self.lo == self.hi else f"{self.lo}..{self.hi}"
            raise VditError(f"batch {b} is outside what {self.path.name} was exported for ({have}); "
                            f"re-export with `vdit export --batch MIN:MAX`")

    def feeds(self, **arrays) -> dict:
        return {k: np.ascontiguousarray(v, dtype=self.dtypes[k]) for k, v in arrays.items()}

    def run(self, **arrays) -> np.ndarray:
        t = arrays.get("t")
        if self.float_above is not None and t is not None and np.ndim(t) == 1:
            high = np.asarray(t) >= self.float_above
            if high.any() and not high.all():     # rows of several calls (a server's batch): each on its graph
                rows_of = lambda m: {k: v[m] if np.ndim(v) and len(v) == len(t) else v for k, v in arrays.items()}
                above, below = self.run(**rows_of(high)), self.run(**rows_of(~high))
                out = np.empty((len(t), *above.shape[1:]), above.dtype)
                out[high], out[~high] = above, below
                return out
        return self.session_for(t).run([self.output], self.feeds(**arrays))[0]

    def run_all(self, **arrays) -> list[np.ndarray]:
        return self.session_for(arrays.get("t")).run(self.output_names, self.feeds(**arrays))

    def run_on_device(self, device_inputs: dict, **arrays) -> list[DeviceArray]:
        """IO binding: OrtValues in `device_inputs` are bound in place, numpy arrays are copied once,
        and the outputs (in graph order) are left on the device for the next call."""
        session = self.session_for(arrays.get("t"))
        binding = session.io_binding()
        for name, value in device_inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in self.feeds(**arrays).items():
            binding.bind_cpu_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.device_type)
        session.run_with_iobinding(binding)
        return [DeviceArray(v) for v in binding.get_outputs()]

    def _saturates(self) -> bool:
        from vdit_deploy.runtimes.cpu_isa import saturation_warning

        on_cpu = self.session.get_providers()[0] == PROVIDERS["cpu"]
        return on_cpu and saturation_warning(self.session.get_modelmeta().custom_metadata_map,
                                             self.meta.precision) is not None

    def saturation_warning(self) -> str | None:
        """A line when this INT8 graph's types saturate on this CPU (runtimes/cpu_isa.py), or, for a Q/DQ
        graph run unfused because of it, a note saying so."""
        from vdit_deploy.runtimes.cpu_isa import host_isa, saturation_warning

        if self.unfused:
            return (f"note: {self.path.name} has full-range int8 weights, which this CPU's ({host_isa()}, no VNNI) "
                    f"fused int8 kernels saturate: ONNX Runtime runs its Q/DQ pairs unfused (exact, at float speed)")
        return saturation_warning(self.session.get_modelmeta().custom_metadata_map, self.meta.precision)

    @property
    def device_type(self) -> str:
        return "cuda" if self.on_device else "cpu"


class OrtRuntime(Runtime):
    name = "ort"

    def __init__(self, artifact, precision: str = "fp32", providers=None, threads: int | None = None,
                 optimization: str = "all", spin: bool = True, provider_options: dict | None = None):
        import onnxruntime as ort

        from vdit_deploy.threads import session_options

        self.providers = resolve_providers(providers, provider_options)

        def options():
            made = session_options()   # threads: the configured count (--threads) or the machine's default
            made.graph_optimization_level = {
                "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
            if threads:
                made.intra_op_num_threads = made.inter_op_num_threads = threads
            if not spin:   # idle ORT threads busy-wait by default: bad when torch shares the process (verify)
                made.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return made

        artifact, graph = Path(artifact), runtime_graph(self.name, precision)
        path = find_onnx(artifact, DENOISER, graph)
        if path.is_file() and artifact.is_file() and read_metadata(path).kind == STEP:
            raise VditError(f"{path} is a fused step graph: pass the export directory or its denoiser.onnx")
        self.graph = _Graph(path, DENOISER, self.providers, options)
        self.fused = None
        if artifact.is_dir():
            check_variant_complete(artifact, graph)
        step = find_variant(artifact, STEP, graph) if artifact.is_dir() else None
        if step is not None:
            self.fused = _Graph(step, STEP, self.providers, options)
        meta = self.graph.meta
        self.contract, self.precision = meta.contract, meta.precision
        self.warnings = [] if self.graph.on_device else [w for g in (self.graph, self.fused) if g is not None
                                                         if (w := g.saturation_warning())]
        for w in self.warnings[:1]:      # one line, on stderr: the graph still runs
            print(w, file=sys.stderr)
        self.null = load_null(self.contract, path.parent)
        self.device = self.graph.session.get_providers()[0].replace("ExecutionProvider", "")
        self._cache_args, self._cache = (path.parent, _Graph, self.providers, options), None

    @property
    def files(self):
        split = self._cache.files if self._cache else []
        graphs = [h for g in (self.graph, self.fused) if g is not None for h in (g, g.float_graph) if h is not None]
        return [f for g in graphs for f in with_data(g.path)] + split

    def cached_step(self, x_t, t: int, cond, guidance: float, coefs, noise, state=None, cache=None):
        """A step of step caching (runtimes/ort_cache.py): the head graph, the tail unless `cache` skips it."""
        if self._cache is None:
            from vdit_deploy.runtimes.ort_cache import OrtCache
            self._cache = OrtCache(*self._cache_args)
        return self._cache.step(self, x_t, t, cond, guidance, coefs, noise, state, cache)

    @property
    def batch_range(self):
        return self.graph.lo, self.graph.hi

    @property
    def inputs(self):
        return [TensorSpec(i.name, tuple(i.shape), ORT_DTYPES.get(i.type, np.float32).__name__)
                for i in self.graph.session.get_inputs()]

    @property
    def outputs(self):
        return [TensorSpec(o.name, tuple(o.shape), ORT_DTYPES.get(o.type, np.float32).__name__)
                for o in self.graph.session.get_outputs()]

    def denoise(self, x_t, t, cond):
        x_t, t = np.asarray(x_t), np.asarray(t)
        cond = self.check_inputs(x_t, t, cond)
        self.graph.check_batch(x_t.shape[0])
        return self.graph.run(x_t=x_t, t=t, **cond).astype(np.float32, copy=False)

    def _null_feeds(self, rows: dict) -> dict:
        """The fused graph's null_<name> inputs: OrtValues on the device when it runs there."""
        feeds = self.fused.feeds(**{NULL_PREFIX + k: v for k, v in rows.items()})
        if not self.fused.on_device:
            return feeds
        import onnxruntime as ort
        return {k: ort.OrtValue.ortvalue_from_numpy(v, self.fused.device_type, 0) for k, v in feeds.items()}

    def step(self, x_t, t: int, cond, guidance: float, coefs, noise, state: SolverState | None = None):
        b = x_t.shape[0]
        # Without guidance the 2B fused graph would do twice the work: run the B denoiser + host update.
        if self.fused is None or (guidance == 1.0 and self.graph.lo <= b <= self.graph.hi):
            x = np.asarray(x_t, dtype=np.float32)
            if guidance == 1.0:
                return apply_step(x, self.denoise(x, np.full(b, t, np.float32), cond), coefs, noise, state)
            return super().step(x, t, cond, guidance, coefs, noise, state)
        ts = np.full(b, t, np.float32)
        if isinstance(x_t, DeviceArray) and not self.fused.on_device:
            x_t = np.asarray(x_t)
        cond = self.check_inputs(x_t, ts, cond)
        self.fused.check_batch(b)
        null = self.null_rows(cond, self._null_feeds)     # made (and uploaded) once per batch and shape
        feeds = dict(t=ts, **cond, guidance=np.float32([guidance]), coefs=np.asarray(coefs, np.float32),
                     noise=noise)
        on_device = dict(null) if self.fused.on_device else {}
        if not self.fused.on_device:
            feeds.update(null)
        for name in ["x_t", *(i for i, _ in STEP_STATE)]:
            value = x_t if name == "x_t" else getattr(state, name, None)
            if value is None:                 # before the first step the state is zeros
                value = np.zeros(x_t.shape, np.float32)
            if isinstance(value, DeviceArray) and self.fused.on_device:
                on_device[name] = value.value
            else:
                feeds[name] = np.asarray(value)
        outs = (self.fused.run_on_device(on_device, **feeds) if self.fused.on_device
                else self.fused.run_all(**feeds))
        if state is not None:             # this step's outputs are the next step's state inputs
            for (name, _), value in zip(STEP_STATE, outs[1:]):
                setattr(state, name, value)
        return outs[0]

    def describe(self) -> str:
        fused = "fused step" if self.fused else "host step"
        t_f = self.graph.float_above
        first = f", fp32 at t >= {t_f:g}" if t_f is not None else ""
        return f"ort:{self.precision} on {self.device} ({fused}{first})"


class OrtTrtRuntime(OrtRuntime):
    """ONNX Runtime with the TensorRT execution provider (CUDA for what TensorRT does not take).
    The EP builds its own engines, cached in DIR/engines/ort-trt; fp16 without an fp16 graph lets the
    EP lower the fp32 graph itself. Settings go in as provider options, not process environment."""
    name = "ort-trt"

    def __init__(self, artifact, precision: str = "fp32", **options):
        root = Path(artifact) if Path(artifact).is_dir() else Path(artifact).parent
        lower_fp32 = precision == FP16 and find_variant(root, DENOISER, FP16) is None
        trt_options = {"trt_engine_cache_enable": "True", "trt_timing_cache_enable": "True",
                       "trt_engine_cache_path": str(root / "engines" / "ort-trt"),
                       "trt_fp16_enable": str(lower_fp32)}
        options.setdefault("providers", ["tensorrt", "cuda"])
        options["provider_options"] = {PROVIDERS["tensorrt"]: trt_options, **options.get("provider_options", {})}
        super().__init__(artifact, precision="fp32" if lower_fp32 else precision, **options)
        self.precision = precision   # the asked one: fp16 may run the fp32 graph lowered by the EP
