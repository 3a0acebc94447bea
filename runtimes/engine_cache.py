"""TensorRT engine cache: an engine is reused only where it was built for exactly this situation.

A TensorRT engine is a compiled plan for one ONNX graph of one model contract, one precision, one
optimization profile (the batch and the contract's named axes), one TensorRT version and one GPU (its
name and compute capability). Each engine file sits beside a JSON
manifest holding those fields (the key) and the engine's own sha256; `EngineCache.lookup` compares
the key field by field so that a refusal can say *which* one changed. Pure Python and torch-free:
TensorRT and cuda-python are imported only by `import_tensorrt()` / `import_cudart()` and `gpu_info()`.

Layout of a cache directory (default: <export dir>/engines):
    step.fp16.b1-2-8.engine        the serialized plan (a text model's: step.fp16.b1-2-8.seq1-120-120.engine)
    step.fp16.b1-2-8.json          its manifest
    timing.cache                   TensorRT's tactic timing cache, shared by every build here
"""
from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from vdit_deploy.contract import BATCH
from vdit_deploy.errors import VditError
from vdit_deploy.export.variants import ENGINE_PRECISIONS
from vdit_deploy.files import atomic_path, sha256_file

ROWS = "rows"
MANIFEST_FORMAT = 2   # 2: the model contract and the named axes' ranges are part of the key
TIMING_CACHE = "timing.cache"


# ---- optimization profile --------------------------------------------------------------------------
@dataclass(frozen=True)
class AxisProfile:
    """The range of one dynamic axis (the batch, or a named axis such as "seq"): TensorRT tunes for
    `opt` and runs anything in [min, max]."""
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise VditError(f"a profile range must satisfy 1 <= MIN <= OPT <= MAX, got {self}")

    @classmethod
    def parse(cls, text: str, option: str = "--batch") -> "AxisProfile":
        """'1:2:8' -> min 1, opt 2, max 8; '4' -> fixed 4; 'MIN:MAX' -> opt = max."""
        parts = str(text).strip().split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise VditError(f"{option} takes MIN:OPT:MAX integers (e.g. 1:2:8), got {text!r}") from None
        if len(values) == 1:
            values *= 3
        elif len(values) == 2:
            values = [values[0], values[1], values[1]]
        elif len(values) != 3:
            raise VditError(f"{option} takes MIN:OPT:MAX (e.g. 1:2:8), got {text!r}")
        return cls(*values)

    @classmethod
    def fixed(cls, size: int) -> "AxisProfile":
        return cls(size, size, size)

    @property
    def is_fixed(self) -> bool:
        return self.min == self.max

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def check(self, size: int, what: str = "batch") -> None:
        if not self.min <= size <= self.max:
            option = "--batch" if what == "batch" else f"--{what}"
            raise VditError(f"{what} {size} is outside the engine's profile {self} "
                            f"(rebuild with `vdit build {option} MIN:OPT:MAX` covering it)")


@dataclass(frozen=True)
class EngineProfile:
    """An engine's optimization profile: the batch and every named axis of the model contract (a text
    model's token count "seq"), each an AxisProfile. Written "1:2:8" or "1:2:8 seq=1:120:120"."""
    batch: AxisProfile
    axes: tuple = ()              # ((name, AxisProfile), ...) sorted by name

    @classmethod
    def of(cls, batch: AxisProfile, axes: dict | None = None) -> "EngineProfile":
        return cls(batch, tuple(sorted((axes or {}).items())))

    @classmethod
    def parse(cls, text: str) -> "EngineProfile":
        batch, *rest = str(text).split()
        axes = {}
        for item in rest:
            name, _, value = item.partition("=")
            axes[name] = AxisProfile.parse(value, f"--{name}")
        return cls.of(AxisProfile.parse(batch), axes)

    @property
    def ranges(self) -> dict:
        return {BATCH: self.batch, **dict(self.axes)}

    @property
    def stem(self) -> str:
        """The file-name part: b1-2-8, then .seq1-120-120 per named axis."""
        return ".".join(f"{'b' if name == BATCH else name}{p.min}-{p.opt}-{p.max}" for name, p in self.ranges.items())

    def __str__(self) -> str:
        return " ".join([str(self.batch), *(f"{name}={p}" for name, p in self.axes)])

    def shapes(self, inputs: dict[str, tuple], axis_names: dict[str, list] | None = None
               ) -> dict[str, tuple[tuple, tuple, tuple]]:
        """Input name -> (min, opt, max) shapes. A dynamic dimension (-1, as TensorRT's network shows
        it) takes the range of its axis, named by `axis_names` (the export's I/O spec: "batch", "seq",
        ...; without one, axis 0 is the batch; "h*4" is 4 times axis h); any dynamic axis the profile
        lacks is refused."""
        out = {}
        b = self.batch   # "rows": the 2B cond + null rows of a guided step (step caching's split graphs)
        ranges = {**self.ranges, ROWS: AxisProfile(2 * b.min, 2 * b.opt, 2 * b.max)}
        for name, shape in inputs.items():
            names = list((axis_names or {}).get(name) or [])
            dims = []
            for i, d in enumerate(shape):
                if d != -1 and not isinstance(d, str):
                    dims.append((d, d, d))
                    continue
                axis = d if isinstance(d, str) else names[i] if i < len(names) else BATCH if i == 0 else None
                base, _, factor = str(axis).partition("*")       # "h*4": 4 x axis h (a decoder's inner sizes)
                if base not in ranges or (factor and not factor.isdigit()):
                    raise VditError(f"input {name} has a dynamic axis {axis or i} ({tuple(shape)}) that the engine "
                                    f"profile {self} does not cover")
                p, k = ranges[base], int(factor or 1)
                dims.append((p.min * k, p.opt * k, p.max * k))
            out[name] = tuple(tuple(d[k] for d in dims) for k in range(3))
        return out


# ---- the cache key -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. Field names are what a refusal message names."""
    onnx_sha256: str
    contract: str                  # Contract.sha256() of the export's model contract
    precision: str
    profile: str                   # EngineProfile: "MIN:OPT:MAX" [+ " seq=MIN:OPT:MAX" per named axis]
    tensorrt: str                  # tensorrt.__version__
    gpu: str                       # device name, e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str        # "9.0"
    options: dict = field(default_factory=dict)   # builder options: opt level, workspace, target...

    def __post_init__(self):
        if self.precision not in ENGINE_PRECISIONS:
            raise VditError(f"precision must be one of {', '.join(ENGINE_PRECISIONS)}, got {self.precision!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EngineKey":
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"key lacks {', '.join(missing)}")
        return cls(**{n: d[n] for n in names})

    def differences(self, other: "EngineKey") -> list[tuple[str, object, object]]:
        """(field, self's value, other's value) for every field that differs, in field order."""
        return [(f.name, getattr(self, f.name), getattr(other, f.name)) for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


@dataclass(frozen=True)
class CachedEngine:
    path: Path
    manifest: dict

    @property
    def key(self) -> EngineKey:
        return EngineKey.from_dict(self.manifest["key"])


class EngineCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def timing_cache(self) -> Path:
        return self.root / TIMING_CACHE

    def paths(self, kind: str, precision: str, profile: EngineProfile) -> tuple[Path, Path]:
        stem = f"{kind}.{precision}.{profile.stem}"
        return self.root / f"{stem}.engine", self.root / f"{stem}.json"

    def read_manifest(self, manifest_path: Path) -> dict:
        """The manifest as a dict; a one-line VditError if it is unreadable or incomplete."""
        try:
            manifest = json.loads(manifest_path.read_text())
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
            if manifest.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
            EngineKey.from_dict(manifest["key"])
            for name in ("engine", "engine_sha256"):
                if not isinstance(manifest.get(name), str):
                    raise ValueError(f"no {name}")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, KeyError, TypeError, VditError) as e:
            raise VditError(f"engine manifest {manifest_path} is corrupt ({e}); delete it or rebuild") from None
        return manifest

    def lookup(self, kind: str, key: EngineKey, verify: bool = True) -> tuple[CachedEngine | None, str]:
        """(the cached engine, "") when one matches `key`, else (None, why not) with the reason in
        one line: missing, corrupt, or which key fields differ (cached value -> wanted value)."""
        engine_path, manifest_path = self.paths(kind, key.precision, EngineProfile.parse(key.profile))
        if manifest_path.is_file():
            try:
                manifest = self.read_manifest(manifest_path)
                cached = CachedEngine(manifest_path.with_name(manifest["engine"]), manifest)
            except VditError as e:
                return None, str(e)
        else:   # another profile or precision of this kind may be cached: name what differs from the nearest
            others = [e for e in self.entries() if e.manifest.get("kind") == kind]
            if not others:
                return None, f"no cached {kind} engine in {self.root}"
            cached = min(others, key=lambda e: len(e.key.differences(key)))
        diffs = cached.key.differences(key)
        if diffs:
            what = "; ".join(f"{name}: cached {_short(old)}, now {_short(new)}" for name, old, new in diffs)
            return None, f"cached {kind} engine {cached.path} does not match ({what})"
        if not cached.path.is_file():
            return None, f"cached {kind} engine {cached.path} is missing (its manifest is there)"
        if verify and sha256_file(cached.path) != cached.manifest["engine_sha256"]:
            return None, f"cached {kind} engine {cached.path} is corrupt (sha256 differs from its manifest)"
        return cached, ""

    def require(self, kind: str, key: EngineKey) -> CachedEngine:
        """The matching engine, or a VditError saying what differs (for --no-build)."""
        cached, why = self.lookup(kind, key)
        if cached is None:
            raise VditError(f"{why}; run `vdit build` without --no-build to build it")
        return cached

    def store(self, kind: str, key: EngineKey, engine: bytes, **extra) -> CachedEngine:
        """Write the engine, then its manifest, each atomically (a manifest never points at a partial
        engine; an engine without a manifest is never used)."""
        engine_path, manifest_path = self.paths(kind, key.precision, EngineProfile.parse(key.profile))
        with atomic_path(engine_path) as tmp:
            tmp.write_bytes(engine)
        manifest = {"format": MANIFEST_FORMAT, "kind": kind, "engine": engine_path.name,
                    "engine_sha256": sha256_file(engine_path), "engine_bytes": len(engine),
                    "key": key.to_dict(),
                    "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    **extra}
        with atomic_path(manifest_path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return CachedEngine(engine_path, manifest)

    def entries(self) -> list[CachedEngine]:
        out = []
        for manifest_path in sorted(self.root.glob("*.json")):
            try:
                manifest = self.read_manifest(manifest_path)
            except VditError:
                continue
            out.append(CachedEngine(manifest_path.with_name(manifest["engine"]), manifest))
        return out


# ---- the environment part of the key -----------------------------------------------------------------
@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str
    total_memory: int = 0


def gpu_info(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device `device`, via cuda-python (no torch)."""
    if not nvidia_device_present():
        raise VditError("TensorRT needs an NVIDIA GPU and none is present here (no /dev/nvidia* device); "
                        "on a CPU, run the ONNX export with ONNX Runtime instead (vdit sample --runtime ort)")
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        raise VditError(f"TensorRT needs an NVIDIA GPU with a working driver; CUDA reports "
                        f"{getattr(err, 'name', err)} ({count or 0} devices)")
    if device >= count:
        raise VditError(f"CUDA device {device} asked for, but only {count} present")
    err, props = cudart.cudaGetDeviceProperties(device)
    check_cuda(err, "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name.rstrip("\x00").strip(), f"{props.major}.{props.minor}", int(props.totalGlobalMem))


def nvidia_device_present() -> bool:
    """An NVIDIA device node exists (desktop /dev/nvidia0.., Jetson /dev/nvhost-ctrl..)."""
    import glob

    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/nvhost-ctrl*"))


def import_cudart():
    """cuda-python's runtime module: `cuda.bindings.runtime` (cuda-python >= 12.6) or `cuda.cudart`."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart   # cuda-python < 12.6 (e.g. older JetPack wheels)
        except ImportError:
            raise VditError("TensorRT runtime needs cuda-python: pip install 'vdit-deploy[trt]' "
                            "(cuda-python matching your CUDA major version)") from None
    return cudart


def import_tensorrt():
    """The tensorrt module (10.x or 11.x), or a one-line VditError saying what is missing."""
    try:
        import tensorrt as trt
    except ModuleNotFoundError as e:
        if e.name != "tensorrt":   # the bindings are there; a module they load is not (e.g. tensorrt_libs)
            raise VditError(f"TensorRT's Python bindings are installed but its libraries did not load ({e}); "
                            "pip install tensorrt-cu12 (or tensorrt-cu13)") from None
        raise VditError("TensorRT is not installed: pip install 'vdit-deploy[trt]' (or use the "
                        "JetPack python3-libnvinfer package on Jetson)") from None
    except (ImportError, OSError) as e:   # the bindings are there but libnvinfer is not
        reason = " ".join(str(e).split())
        raise VditError(f"TensorRT's Python bindings are installed but its libraries did not load ({reason}); "
                        "pip install tensorrt-cu12 (or tensorrt-cu13)") from None
    major = int(trt.__version__.split(".")[0])
    if major < 10:   # JetPack 5 (TensorRT 8.5/8.6): see the porting notes in trt_network.py
        raise VditError(f"TensorRT {trt.__version__} is not supported: vdit needs TensorRT >= 10 "
                        "(JetPack 6 or later on Jetson); run the ONNX export with ONNX Runtime there "
                        "(vdit sample --runtime ort)")
    return trt


_LOGGER: tuple = (None, None)   # (tensorrt module, its Logger)


def tensorrt_logger(trt):
    """The process's one trt.Logger, shared by builder, parser and runtime: TensorRT keeps the first
    logger it is given and warns when another arrives."""
    global _LOGGER
    if _LOGGER[0] is not trt:
        _LOGGER = (trt, trt.Logger(trt.Logger.WARNING))
    return _LOGGER[1]


def check_cuda(err, what: str) -> None:
    code = err[0] if isinstance(err, tuple) else err
    if int(code) != 0:
        raise VditError(f"{what} failed: {getattr(code, 'name', code)}")

