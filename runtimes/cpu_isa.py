"""Which INT8 kernels ONNX Runtime picks on a CPU, and the INT8 types that do not saturate there.

ONNX Runtime's MLAS chooses its u8 x s8 GEMM kernel by cpuid (mlas/lib/platform.cpp):
    AVX-512 VNNI / AVX-VNNI / AMX   VPDPBUSD: u8*s8 products summed straight into int32.
    AVX2, AVX-512 without VNNI      VPMADDUBSW: each PAIR of u8*s8 products is summed into a signed
                                    16-bit integer first, saturating at 32767 (255*127*2 = 64770 fits
                                    nowhere). Activations spread over the full u8 range and full-range
                                    s8 weights hit it: the 16 dB INT8 of issue 25.
    arm64                           UDOT/SDOT (dotprod) or widening NEON multiplies: int32 sums.
Static Q/DQ graphs run on the same u8 x s8 kernel (ONNX Runtime turns s8 activations into u8 on x86:
QDQS8ToU8), so they saturate the same way. Two cures (ONNX Runtime's quantization docs): reduce_range
(7-bit weights: a pair sums to at most 255*64*2 = 32640, no saturation, the same fast kernel) or U8U8
(a 16-bit kernel with no pairwise step, slower). A CPU's Q/DQ graph has asymmetric u8 activations (a
zero point: the skewed ranges after GELU and adaLN's shift keep all 256 levels); TensorRT's explicit
quantization takes symmetric s8 only. What each target gets (TARGETS) was measured: docs/calibration.md.

Detection mirrors MLAS: cpuid, read through numpy's own CPU-feature table (numpy dispatches its
SIMD loops by cpuid too), with /proc/cpuinfo for AVX-VNNI, which numpy does not list. Torch-free.
"""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

from vdit_deploy.errors import VditError

VNNI, AVX2, ARM64, TENSORRT = "vnni", "avx2", "arm64", "tensorrt"
ISAS = (VNNI, AVX2, ARM64)                       # CPU targets; tensorrt: a GPU build (a board profile)
SATURATING = (AVX2,)                             # CPUs whose u8 x s8 kernel sums pairs in 16 bits
META_KEY = "vdit.int8"                           # graph metadata: the Int8Choice it was made with


@dataclass(frozen=True)
class Int8Choice:
    """The INT8 types of one graph for one target: what onnxruntime.quantization is called with."""
    target: str                   # vnni | avx2 | arm64 | tensorrt
    weight_type: str              # "int8" | "uint8"
    activation_type: str          # "uint8" (dynamic, and a CPU's Q/DQ) | "int8" (TensorRT's Q/DQ)
    reduce_range: bool            # 7-bit weights
    activation_symmetric: bool    # zero point 0 (TensorRT) or fitted to each tensor's [min, max] (CPUs)

    @property
    def saturation_safe(self) -> bool:
        """Runs without 16-bit saturation on every CPU (7-bit weights, or a U8U8 kernel)."""
        return self.reduce_range or self.weight_type == "uint8"

    def quant_type(self, tensor: str):
        """onnxruntime.quantization's QuantType of the "weight" or "activation" side."""
        from onnxruntime.quantization import QuantType

        return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[getattr(self, f"{tensor}_type")]

    def describe(self) -> str:
        types = f"{'U8' if self.activation_type == 'uint8' else 'S8'}{'U8' if self.weight_type == 'uint8' else 'S8'}"
        return (f"{types}, {'symmetric' if self.activation_symmetric else 'asymmetric'} activations"
                f"{', 7-bit weights (reduce_range)' if self.reduce_range else ''} for {self.target}")

    def to_json(self) -> str:
        import json
        return json.dumps({"target": self.target, "weight_type": self.weight_type,
                           "activation_type": self.activation_type, "reduce_range": self.reduce_range,
                           "activation_symmetric": self.activation_symmetric})


# mode -> target -> choice. dynamic: asymmetric u8 activations (DynamicQuantizeLinear). qdq on a CPU: the
# same u8 activations with ranges from the calibration set; for TensorRT symmetric S8S8, what its explicit
# quantization takes. avx2: 7-bit weights in both modes.
TARGETS = {
    "dynamic": {VNNI: Int8Choice(VNNI, "int8", "uint8", False, False),
                AVX2: Int8Choice(AVX2, "int8", "uint8", True, False),
                ARM64: Int8Choice(ARM64, "int8", "uint8", False, False)},
    "qdq": {VNNI: Int8Choice(VNNI, "int8", "uint8", False, False),
            AVX2: Int8Choice(AVX2, "int8", "uint8", True, False),
            ARM64: Int8Choice(ARM64, "int8", "uint8", False, False),
            TENSORRT: Int8Choice(TENSORRT, "int8", "int8", False, True)},
}


def _numpy_features() -> dict:
    try:
        from numpy._core._multiarray_umath import __cpu_features__      # numpy >= 2
    except ImportError:
        from numpy.core._multiarray_umath import __cpu_features__       # numpy 1.x
    return dict(__cpu_features__)


def _cpuinfo_flags(path="/proc/cpuinfo") -> set[str]:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def detect_isa(features: dict | None = None, flags: set[str] | None = None, machine: str | None = None) -> str:
    """This CPU as an INT8 target: vnni, avx2 (any x86 without VNNI) or arm64. The arguments stand in
    for numpy's cpuid table, /proc/cpuinfo flags and platform.machine() (tests)."""
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64") or machine.startswith("armv8"):
        return ARM64
    features = _numpy_features() if features is None else features
    flags = _cpuinfo_flags() if flags is None else flags
    if features.get("AVX512VNNI") and features.get("AVX512BW"):
        return VNNI
    # AVX-VNNI (Alder Lake, Zen 5 client) is cpuid leaf 7.1, which numpy does not read: take it from
    # /proc/cpuinfo, but only where that file describes this CPU as cpuid does (an emulator passes the
    # host's file through while cpuid shows the emulated CPU).
    agrees = bool(flags) and ("avx2" in flags) == bool(features.get("AVX2")) \
        and ("avx512f" in flags) == bool(features.get("AVX512F"))
    if agrees and ({"avx_vnni", "amx_int8"} & flags):
        return VNNI
    return AVX2


@functools.lru_cache(maxsize=1)
def host_isa() -> str:
    """This machine's detect_isa(), once per process."""
    return detect_isa()


def profile_target(name_or_path: str, mode: str) -> str:
    """A board profile (runtimes/profiles/*.json or a path) as an INT8 target: its Q/DQ graph is built
    by TensorRT on the board's GPU; its dynamic graph runs on the board's CPU, arm64 on a Jetson."""
    from vdit_deploy.runtimes.profiles import load_profile

    profile = load_profile(name_or_path)
    if mode == "qdq":
        return TENSORRT
    if profile.unified_memory:     # Jetson: Cortex-A78AE, with the dot-product instructions
        return ARM64
    raise VditError(f"profile {profile.name} is a TensorRT GPU build: its INT8 graph is the Q/DQ one "
                    f"(--mode qdq); for the dynamic CPU graph pass --target {', '.join(ISAS)}")


def choose(mode: str, target: str | Int8Choice | None = None) -> Int8Choice:
    """The INT8 types for `mode` (dynamic | qdq) on `target`: an ISA name, tensorrt, a board profile
    (name or path), None for this CPU, or an Int8Choice of one's own (benchmarks: other types than a
    target's)."""
    if mode not in TARGETS:
        raise VditError(f"int8 mode must be one of {', '.join(TARGETS)}, got {mode!r}")
    if isinstance(target, Int8Choice):
        return target
    if target is None:
        target = host_isa()
    elif target not in TARGETS[mode]:
        if target in TARGETS["qdq"]:
            raise VditError(f"--target {target} is a GPU build: it takes the Q/DQ graph (--mode qdq)")
        if not Path(target).suffix and not Path(target).exists() and "/" not in target:
            from vdit_deploy.runtimes.profiles import PROFILE_DIR
            if not (PROFILE_DIR / f"{target}.json").is_file():
                raise VditError(f"INT8 target must be one of {', '.join(TARGETS['qdq'])} or a board profile "
                                f"(`vdit plan --list`), got {target!r}")
        target = profile_target(target, mode)
    return TARGETS[mode][target]


def read_choice(custom_metadata: dict) -> dict | None:
    """The vdit.int8 record of a graph's metadata, or None (not INT8, or made before the record)."""
    import json

    raw = custom_metadata.get(META_KEY)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def saturation_warning(custom_metadata: dict, precision: str, isa: str | None = None) -> str | None:
    """One line when an INT8 graph made with full-range s8 weights (for VNNI, arm64 or TensorRT) runs
    on a CPU whose kernel saturates; None when it is safe here. A graph from before the record
    (vdit.int8 missing) was made with full-range weights."""
    if not precision.startswith("int8"):
        return None
    isa = isa or host_isa()
    if isa not in SATURATING:
        return None
    record = read_choice(custom_metadata) or {"target": "vnni (made before vdit-deploy recorded it)",
                                              "weight_type": "int8", "reduce_range": False}
    if record.get("reduce_range") or record.get("weight_type") == "uint8":
        return None
    return (f"warning: this INT8 graph was made for {record.get('target')} (full-range int8 weights) and this CPU "
            f"({isa}, no VNNI) saturates its u8 x s8 sums: expect a large error; remake it here with "
            f"`vdit calibrate int8` (or --target {isa})")


def tensorrt_refusal(custom_metadata: dict, name: str) -> str | None:
    """The line a TensorRT build refuses a CPU's Q/DQ graph (file `name`) with: asymmetric activations,
    and TensorRT's explicit quantization takes zero points of 0 only. None for any other graph."""
    record = read_choice(custom_metadata) or {}
    if record.get("activation_symmetric", True):     # TensorRT's, not INT8, or from before the record
        return None
    return (f"{name} was made for a CPU ({record.get('target')}: asymmetric u8 activations, for ONNX "
            f"Runtime) and TensorRT takes symmetric int8 only: remake it with `vdit calibrate int8 --mode qdq "
            f"--target tensorrt` (or a board profile)")
