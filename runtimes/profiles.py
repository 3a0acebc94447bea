"""Deployment profiles and the memory planner: will this model, at this batch and precision, fit the board?

A profile is a JSON file (runtimes/profiles/*.json, or any path: copy one and edit it) that fixes what
`vdit build --target NAME` hands TensorRT: the batch range (min = opt = max on Jetson: fixed shapes),
optionally the ranges of the model contract's named axes ("axes": {"seq": [min, opt, max]}; default:
the export's range, opt = max), precision, builder optimization level, workspace limit, optional DLA
core, and the memory the board has.

`plan_memory` estimates, before any build, the bytes one engine needs:
    weights       num_params x bytes of the engine precision
    activations   the peak live tensors of one forward (attention score matrices included), x engine batch
                  (another architecture than the built-in one: read off its ONNX graph, see GraphSize)
    I/O buffers   the fp32 video tensors the runtime keeps (x_t, noise, x_prev, eps)
    workspace     the builder's memory-pool limit (the engine's scratch is at most this)
    CUDA context  driver context + the cuBLAS/cuDNN/TensorRT kernels it loads
On Jetson CPU and GPU share one memory, so host-side copies count too: the ONNX weights the parser holds
and the serialized engine while building, the engine file while loading. Torch-free.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from vdit_deploy.config import ModelConfig
from vdit_deploy.errors import VditError
from vdit_deploy.export.variants import BEST, ENGINE_PRECISIONS, FP16, FP32, INT8

PROFILE_DIR = Path(__file__).parent / "profiles"
GIB, MIB = 1 << 30, 1 << 20

# Bytes per weight in the engine and per activation between layers. INT8 engines keep LayerNorm, softmax
# and the GEMM outputs in fp16, so their activations are counted at 2 bytes; "best" is counted as fp16.
WEIGHT_BYTES = {FP32: 4, FP16: 2, INT8: 1, BEST: 2}
ACTIVATION_BYTES = {FP32: 4, FP16: 2, INT8: 2, BEST: 2}
# Bytes per weight of the ONNX file the builder parses: fp32/fp16 builds read the fp32 export (TensorRT
# casts); int8 builds read a Q/DQ graph with int8 initializers. Pass onnx_bytes to use the real file.
ONNX_BYTES = {FP32: 4, FP16: 4, INT8: 1, BEST: 4}

# What DLA cannot take from this transformer (TensorRT "DLA Supported Layers and Restrictions"): these run
# on the GPU when gpu_fallback is on, and every GPU<->DLA switch splits the graph into another DLA loadable
# (at most 16 loaded per core), so expect most of a transformer to stay on the GPU.
DLA_UNSUPPORTED = (
    "MatMul between two activations (attention Q.K^T and A.V): DLA only has convolution/fully-connected with constant weights",
    "LayerNormalization (INormalizationLayer is not a DLA layer)",
    "Gather (the label embedding lookup)",
    "Conv3d (tubelet embedding) and 5-D tensors: DLA convolution, elementwise and activation layers are 2-D (NCHW) only",
    "Softmax: Xavier's DLA has none; Orin's only over a channel/spatial axis, approximate above 1024 elements",
    "GELU, Sin/Cos (timestep frequencies): DLA activations are ReLU, Sigmoid, TanH, clipped/leaky ReLU only",
    "dynamic shapes and fp32: DLA needs min = opt = max and runs fp16 or int8",
)


# ---- profiles -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildProfile:
    name: str
    description: str
    unified_memory: bool          # Jetson: CPU and GPU share memory_gib, host copies count
    memory_gib: float             # memory the GPU can address (all of RAM on Jetson)
    reserved_gib: float           # left to the OS, the CPU side and other processes
    cuda_context_mib: float       # CUDA context + libraries, measured once per process
    workspace_mib: int            # TensorRT builder memory-pool limit (MemoryPoolType.WORKSPACE)
    precision: str                # fp32 | fp16 | int8 | best
    batch: tuple[int, int, int]   # (min, opt, max) videos per call; min = max: fixed shapes
    optimization_level: int = 3   # builder_optimization_level 0..5 (TensorRT >= 8.6; older ones ignore it)
    dla_cores: int = 0            # DLA cores the board has
    dla_core: int | None = None   # run on this DLA core (None: GPU only)
    gpu_fallback: bool = True     # layers DLA cannot take run on the GPU (else the build fails)
    axes: dict = field(default_factory=dict)   # named axis ("seq") -> (min, opt, max); default: the export's
    vae_tile: int = 0             # VAE decode tile, output pixels (0: the decoder's diffusers default)
    path: str = field(default="", compare=False)

    @property
    def fixed_shapes(self) -> bool:
        return self.batch[0] == self.batch[2]

    @property
    def usable_bytes(self) -> int:
        return int((self.memory_gib - self.reserved_gib) * GIB)

    def describe(self) -> str:
        lo, opt, hi = self.batch
        lines = [f"{self.name}: {self.description}",
                 f"  memory     {self.memory_gib:g} GiB ({'shared by CPU and GPU' if self.unified_memory else 'GPU'}),"
                 f" {self.reserved_gib:g} GiB reserved, CUDA context ~{self.cuda_context_mib:g} MiB",
                 f"  build      {self.precision}, batch {lo}:{opt}:{hi}{' (fixed shapes)' if self.fixed_shapes else ''},"
                 f" workspace {self.workspace_mib} MiB, optimization level {self.optimization_level}"]
        for name, (lo, opt, hi) in self.axes.items():
            lines.append(f"  {name:<10} {lo}:{opt}:{hi}{' (fixed)' if lo == hi else ''}")
        if self.dla_core is None:
            lines.append(f"  DLA        off ({self.dla_cores} core(s) on the board)")
        else:
            lines.append(f"  DLA        core {self.dla_core}, GPU fallback {'on' if self.gpu_fallback else 'off'};"
                         f" DLA cannot take:")
            lines += [f"    - {item}" for item in DLA_UNSUPPORTED]
        return "\n".join(lines)


def _check(cond: bool, source: str, message: str) -> None:
    if not cond:
        raise VditError(f"{source}: {message}")


def profile_from_dict(data: dict, source: str = "profile") -> BuildProfile:
    """Validate a profile's fields, each failure one line naming the file and the field."""
    if not isinstance(data, dict):
        raise VditError(f"{source}: a profile is a JSON object")
    known = {f.name for f in fields(BuildProfile)} - {"path"}
    unknown = sorted(set(data) - known)
    _check(not unknown, source, f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    required = ("name", "description", "unified_memory", "memory_gib", "reserved_gib", "cuda_context_mib",
                "workspace_mib", "precision", "batch")
    missing = [k for k in required if k not in data]
    _check(not missing, source, f"missing field(s) {', '.join(missing)}")
    d = dict(data)

    def number(key, lo, integer=False):
        v = d[key]
        ok = isinstance(v, int if integer else (int, float)) and not isinstance(v, bool) and v >= lo
        _check(ok, source, f"{key} must be {'an integer' if integer else 'a number'} >= {lo}, got {v!r}")

    _check(isinstance(d["name"], str) and d["name"], source, "name must be a non-empty string")
    _check(isinstance(d["description"], str), source, "description must be a string")
    for key in ("unified_memory", "gpu_fallback"):
        _check(isinstance(d.get(key, True), bool), source, f"{key} must be true or false, got {d.get(key)!r}")
    number("memory_gib", 0.25)
    number("reserved_gib", 0)
    number("cuda_context_mib", 0)
    number("workspace_mib", 1, integer=True)
    _check(d["reserved_gib"] < d["memory_gib"], source,
           f"reserved_gib ({d['reserved_gib']}) must be less than memory_gib ({d['memory_gib']})")
    _check(d["precision"] in ENGINE_PRECISIONS, source,
           f"precision must be one of {', '.join(ENGINE_PRECISIONS)}, got {d['precision']!r}")
    def triple(value, what):
        b = [value] * 3 if isinstance(value, int) and not isinstance(value, bool) else value
        ok = (isinstance(b, list) and len(b) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in b)
              and 1 <= b[0] <= b[1] <= b[2])
        _check(ok, source, f"{what} must be [min, opt, max] with 1 <= min <= opt <= max (or one integer), got {value!r}")
        return tuple(b)

    d["batch"] = triple(d["batch"], "batch")
    axes = d.setdefault("axes", {})
    _check(isinstance(axes, dict) and "batch" not in axes, source,
           f"axes must map named axes (e.g. seq) to [min, opt, max], got {axes!r}")
    d["axes"] = {name: triple(r, f"axes.{name}") for name, r in axes.items()}
    d.setdefault("optimization_level", 3)
    _check(d["optimization_level"] in range(6) and not isinstance(d["optimization_level"], bool), source,
           f"optimization_level must be 0..5, got {d['optimization_level']!r}")
    d.setdefault("dla_cores", 0)
    number("dla_cores", 0, integer=True)
    d.setdefault("vae_tile", 0)
    number("vae_tile", 0, integer=True)
    core = d.setdefault("dla_core", None)
    if core is not None:
        _check(isinstance(core, int) and not isinstance(core, bool) and 0 <= core, source,
               f"dla_core must be null or a core index, got {core!r}")
        _check(core < d["dla_cores"], source, f"dla_core {core} asked for, but {d['name']} has "
               f"{d['dla_cores']} DLA core(s) (dla_cores); set dla_core to null")
        _check(d["precision"] in (FP16, INT8), source, f"DLA runs fp16 or int8, not {d['precision']}")
        _check(all(r[0] == r[2] for r in (d["batch"], *d["axes"].values())), source,
               "DLA needs fixed shapes: batch (and axes) min, opt and max must be equal")
    return BuildProfile(**d, path=source)


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str | Path) -> BuildProfile:
    """A shipped profile by name (orin-nano, orin-nx, agx-orin, desktop-gpu) or a JSON file's path."""
    path = Path(name_or_path)
    if not path.suffix and (PROFILE_DIR / f"{name_or_path}.json").is_file():
        path = PROFILE_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise VditError(f"unknown target {str(name_or_path)!r}: choose from {', '.join(profile_names())} "
                        "or give the path of a profile .json (copy one from `vdit plan --list`)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VditError(f"{path} is not valid JSON: {e}") from None
    return profile_from_dict(data, str(path))


# ---- memory planner -----------------------------------------------------------------------------
def activation_elements(cfg: ModelConfig) -> dict[str, int]:
    """Peak live elements of one sample's forward, per sublayer (ModelConfig.activation_elements)."""
    return cfg.activation_elements()


@dataclass(frozen=True)
class GraphSize:
    """What the planner sizes for an architecture other than the built-in one (an export whose
    meta.config is None), read off its denoiser graph: the parameters are the float initializers'
    elements (the weights the engine holds: the module's parameters and the constants the exporter
    folded, such as positional tables); the activations are the largest operator's inputs plus outputs for one video at
    the named axes' max, from ONNX shape inference (a lower bound of what is live: the residual stream
    and TensorRT's fusions are not modelled)."""
    model: str                    # the model's class
    video_shape: tuple            # (C, F, H, W)
    params: int
    activations: int              # elements, one video
    sizes: dict                   # the named axes' sizes it was inferred at

    def num_params(self) -> int:
        return self.params

    def activation_elements(self) -> dict[str, int]:
        return {"largest operator": self.activations}


def graph_size(onnx_path: Path, sizes: dict | None = None) -> GraphSize:
    """GraphSize of the denoiser graph at `onnx_path` (an export's; external weights are not read)."""
    import onnx

    from vdit_deploy.export.metadata import read_metadata

    meta = read_metadata(onnx_path)
    sizes = {**{name: hi for name, (_, hi) in meta.contract.axes.items()}, **(sizes or {}), "batch": 1}
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    params = sum(int(np.prod(i.dims)) for i in graph.initializer if i.data_type in floats)
    for value in graph.input:       # concrete sizes in, then every intermediate shape follows
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param in sizes:
                size = sizes[d.dim_param]
                d.Clear()
                d.dim_value = size
    del graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    except Exception as e:   # onnx raises InferenceError and others
        raise VditError(f"{onnx_path}: ONNX shape inference failed ({str(e).splitlines()[0][:200]}); "
                        "cannot size its activations") from None
    known = {}
    for v in [*inferred.input, *inferred.value_info, *inferred.output]:
        dims = v.type.tensor_type.shape.dim
        if v.type.tensor_type.elem_type in floats and all(d.HasField("dim_value") for d in dims):
            known[v.name] = int(np.prod([d.dim_value for d in dims]))
    weights = {i.name for i in graph.initializer}
    largest = max((sum(known.get(name, 0) for name in [*node.input, *node.output] if name not in weights)
                   for node in inferred.node), default=0)
    return GraphSize(meta.model["class"], tuple(meta.contract.latent), params, largest,
                     {k: v for k, v in sizes.items() if k != "batch"})


@dataclass
class MemoryPlan:
    config: "ModelConfig | GraphSize"
    profile: BuildProfile
    batch: int                    # videos per call
    engine_batch: int             # denoiser batch: 2 x batch with classifier-free guidance
    precision: str
    rows: dict[str, tuple[int, int]]   # name -> (bytes at run time, bytes while building)
    notes: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)

    @property
    def run_bytes(self) -> int:
        return sum(r for r, _ in self.rows.values())

    @property
    def build_bytes(self) -> int:
        return sum(b for _, b in self.rows.values())

    @property
    def peak_bytes(self) -> int:
        return max(self.run_bytes, self.build_bytes)

    @property
    def available_bytes(self) -> int:
        return self.profile.usable_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.available_bytes

    def table(self) -> str:
        p, cfg = self.profile, self.config
        lines = [f"memory plan: {'x'.join(map(str, cfg.video_shape))} video, {cfg.num_params() / 1e6:.1f}M params, "
                 f"batch {self.batch} (denoiser batch {self.engine_batch}), {self.precision} on {p.name}",
                 f"{'':<34}{'run':>11}{'build':>11}"]
        for name, (run, build) in self.rows.items():
            lines.append(f"{name:<34}{_gib(run):>11}{_gib(build):>11}")
        lines.append(f"{'total':<34}{_gib(self.run_bytes):>11}{_gib(self.build_bytes):>11}")
        lines.append(f"{'usable on ' + p.name:<34}{_gib(self.available_bytes):>11}"
                     f"   ({p.memory_gib:g} GiB - {p.reserved_gib:g} GiB reserved)")
        lines.append(f"verdict: {'fits' if self.fits else 'does NOT fit'} "
                     f"({100 * self.peak_bytes / self.available_bytes:.0f}% of usable memory at peak)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def refusal(self) -> str:
        phase = "building" if self.build_bytes > self.run_bytes else "running"
        msg = (f"{self.precision} at batch {self.batch} needs ~{_gib(self.peak_bytes)} GiB while {phase} but "
               f"{self.profile.name} has {_gib(self.available_bytes)} GiB usable")
        if self.suggestions:
            return msg + "; try " + ", or ".join(self.suggestions)
        return msg + "; no smaller batch, precision or frame count fits: use a smaller preset or a larger board"

    def check(self) -> "MemoryPlan":
        """Raise a one-line VditError with a suggestion when the plan does not fit."""
        if not self.fits:
            raise VditError(self.refusal())
        return self


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _estimate(cfg: ModelConfig, batch: int, precision: str, profile: BuildProfile, guidance: bool,
              onnx_bytes: int | None) -> MemoryPlan:
    if precision not in ENGINE_PRECISIONS:
        raise VditError(f"precision must be one of {', '.join(ENGINE_PRECISIONS)}, got {precision!r}")
    if batch < 1:
        raise VditError(f"batch must be >= 1, got {batch}")
    eng = 2 * batch if guidance else batch
    weights = cfg.num_params() * WEIGHT_BYTES[precision]
    acts = eng * max(activation_elements(cfg).values()) * ACTIVATION_BYTES[precision]
    video = 4 * int(np.prod(cfg.video_shape))
    io = video * (3 * batch + 2 * eng)          # x_t, noise, x_prev per video + denoiser input and eps
    workspace = profile.workspace_mib * MIB
    context = int(profile.cuda_context_mib * MIB)
    rows = {f"weights ({precision})": (weights, weights),
            f"activations (peak, batch {eng})": (acts, acts),
            "I/O buffers (fp32 video)": (io, io),
            "workspace limit": (workspace, workspace),
            "CUDA context + libraries": (context, context)}
    notes = []
    if profile.unified_memory:
        onnx = onnx_bytes if onnx_bytes is not None else cfg.num_params() * ONNX_BYTES[precision]
        rows["ONNX weights held by the parser"] = (0, onnx)
        rows["serialized engine (host copy)"] = (weights, weights)
        notes.append("CPU and GPU share memory here: the parsed ONNX and the serialized engine count while "
                     "building, the engine file while loading")
    if precision == BEST:
        notes.append("precision best counted as fp16; TensorRT may keep some layers in fp32")
    if isinstance(cfg, GraphSize):
        at = ", ".join(f"{k} {v}" for k, v in cfg.sizes.items())
        notes.append(f"{cfg.model} is sized from its ONNX graph{' at ' + at if at else ''}: weights exact, activations "
                     "the largest operator's inputs + outputs (a lower bound: the residual stream is not counted)")
    else:
        notes.append("activations include full attention score matrices: an upper bound where TensorRT fuses attention")
    return MemoryPlan(cfg, profile, batch, eng, precision, rows, notes)


def _largest(lo: int, hi: int, ok) -> int | None:
    """The largest n in lo..hi with ok(n), for ok true up to some n and false above: a binary search,
    so `--batch 1000000000` costs 30 estimates, not a billion."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def plan_memory(config: "ModelConfig | GraphSize", batch: int, precision: str, profile: BuildProfile,
                guidance: bool = True, onnx_bytes: int | None = None) -> MemoryPlan:
    """Estimate the memory of one engine; `plan.check()` refuses with a suggestion when it will not fit.
    `guidance`: the fused sampler step runs the conditional and null passes as one batch of 2 x batch.
    `onnx_bytes`: size of the ONNX file(s) the builder will parse, when known."""
    plan = _estimate(config, batch, precision, profile, guidance, onnx_bytes)
    if plan.fits:
        return plan
    suggestions = []
    fits = lambda b: _estimate(config, b, precision, profile, guidance, onnx_bytes).fits   # monotone in b
    fitting_batch = _largest(1, batch - 1, fits)
    if fitting_batch:
        suggestions.append(f"a smaller batch (--batch {fitting_batch} fits)")
    if precision != INT8 and _estimate(config, batch, INT8, profile, guidance, None).fits:
        suggestions.append("int8 (--precision int8 after `vdit calibrate` fits)")
    fitting = None
    if isinstance(config, ModelConfig):   # another architecture's frame count is fixed in its graph
        tt = config.tubelet[0]
        fitting = _largest(1, config.frames // tt - 1, lambda k: _estimate(config.replace(frames=k * tt), batch,
                                                                            precision, profile, guidance,
                                                                            onnx_bytes).fits)
    if fitting:
        suggestions.append(f"fewer frames ({fitting * tt} fit: `vdit plan --frames {fitting * tt}`)")
    plan.suggestions = suggestions
    return plan


def model_for_plan(preset_name=None, checkpoint=None, onnx_path=None, sizes: dict | None = None
                   ) -> tuple["ModelConfig | GraphSize", int | None, str]:
    """What `vdit plan` sizes: exactly one of a preset, a checkpoint's config or an export (then its real
    ONNX size too; another architecture than the built-in one is sized from its denoiser graph at the
    named axes' `sizes`, default their max) -> (config or GraphSize, ONNX bytes or None, what it is).
    Torch-free."""
    if sum(x is not None for x in (preset_name, checkpoint, onnx_path)) != 1:
        raise VditError("give exactly one of --preset, --checkpoint or --onnx")
    if preset_name is not None:
        from vdit_deploy.config import preset
        return preset(preset_name), None, f"preset {preset_name}"
    if checkpoint is not None:
        from vdit_deploy.checkpoint import read_info
        return read_info(checkpoint).model, None, f"checkpoint {checkpoint}"
    from vdit_deploy.export.metadata import DENOISER, find_onnx, read_metadata
    file = find_onnx(onnx_path)
    size = file.stat().st_size + sum(p.stat().st_size for p in file.parent.glob(file.name + ".data"))
    meta = read_metadata(file)
    if meta.config is not None:
        return meta.config, size, f"export {file}"
    graph = file if meta.kind == DENOISER else find_onnx(file.parent, DENOISER, meta.precision)
    return graph_size(graph, sizes), size, f"export {file} ({meta.model['class']}, sized from {graph.name})"


def plan_for_export(onnx_path: Path, batch: int, precision: str, profile: BuildProfile,
                    axes: dict | None = None) -> MemoryPlan:
    """The plan `vdit build --target` checks: an export's graph at the engine's max batch and named
    axes (`axes`: name -> AxisProfile)."""
    sizes = {name: p.max for name, p in (axes or {}).items()}
    model, onnx_bytes, _ = model_for_plan(onnx_path=onnx_path, sizes=sizes)
    return plan_memory(model, batch, precision, profile, onnx_bytes=onnx_bytes)
