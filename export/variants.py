"""Precisions and graph variants: the one place that names them (torch-free, no imports of our own).

An export directory holds one fp32 graph per kind and, beside it, the precision variants:
    denoiser.onnx                fp32                      `vdit export` (step.onnx too)
    denoiser.fp16.onnx           fp16, fp32 I/O            `vdit calibrate fp16` (step.fp16.onnx too)
    denoiser.int8-dynamic.onnx   INT8, ranges per call     `vdit calibrate int8`: ONNX Runtime on CPUs
    denoiser.int8-qdq.onnx       INT8, static Q/DQ         `vdit calibrate int8 --mode qdq`: TensorRT (step too)
A graph's vdit.precision metadata is its file tag. Releases before int8-dynamic wrote the dynamic graph
as denoiser.int8.onnx with precision "int8": such files are still found and read as int8-dynamic.

What users type is a runtime's precision, not a file tag: "int8" is the dynamic graph on ONNX Runtime
and an engine built from the Q/DQ graph on TensorRT (`runtime_graph`).
"""
from __future__ import annotations

from pathlib import Path

DENOISER, STEP = "denoiser", "step"
# step caching's split graphs (`vdit export --cache-split K`, export/cache_export.py): a head and a tail per kind
DENOISER_HEAD, DENOISER_TAIL, STEP_HEAD, STEP_TAIL = "denoiser-head", "denoiser-tail", "step-head", "step-tail"
CACHE_KINDS = (DENOISER_HEAD, DENOISER_TAIL, STEP_HEAD, STEP_TAIL)
KINDS = (DENOISER, STEP, *CACHE_KINDS)
CACHE_FIT_FILE = "cache_fit.json"   # teacache's polynomial, from `vdit calibrate cache`
# The VAE decoder's graphs (vdit_deploy/decode.py): another model (the pipeline's vae/), its own metadata.
# decoder.onnx decodes per frame or a causal VAE's first chunk; decoder-chunk.onnx a causal VAE's later
# chunks, with the feature cache as inputs and outputs. Precision variants as the denoiser's (fp16).
DECODER, DECODER_CHUNK = "decoder", "decoder-chunk"
DECODER_KINDS = (DECODER, DECODER_CHUNK)
TEXT_ENCODER = "text_encoder"     # the pipeline's text encoder (vdit_deploy/text_onnx.py), fp32

FP32, FP16, INT8_DYNAMIC, INT8_QDQ = "fp32", "fp16", "int8-dynamic", "int8-qdq"
GRAPH_PRECISIONS = (FP32, FP16, INT8_DYNAMIC, INT8_QDQ)   # one file per kind each
OLD_TAGS = {"int8": INT8_DYNAMIC}                          # tags (and file names) of older releases

# --precision each runtime takes. trt's are engine build modes (also the engine cache's and the board
# profiles'): best turns every precision flag on and builds the int8 graph where the export has one.
INT8, BEST, BF16 = "int8", "best", "bf16"
ENGINE_PRECISIONS = (FP32, FP16, INT8, BEST)
TORCH_PRECISIONS = (FP32, FP16, BF16)
RUNTIME_PRECISIONS = {
    "torch": TORCH_PRECISIONS,
    "ort": (*GRAPH_PRECISIONS, INT8),
    "ort-trt": (*GRAPH_PRECISIONS, INT8),
    "trt": ENGINE_PRECISIONS,
}
# runtime precision -> the graph it loads; trt's fp16 and best may fall back (trt_network.onnx_for)
_LOADS = {"ort": {INT8: INT8_DYNAMIC}, "ort-trt": {INT8: INT8_DYNAMIC},
          "trt": {FP32: FP32, FP16: FP16, INT8: INT8_QDQ, BEST: INT8_QDQ}}


def graph_precision(tag: str) -> str:
    """A file tag as written by any release -> today's name (int8 -> int8-dynamic)."""
    return OLD_TAGS.get(tag, tag)


def variant_file(kind: str, precision: str = FP32) -> str:
    """The file name of a graph: denoiser.onnx, denoiser.fp16.onnx, step.int8-qdq.onnx ..."""
    precision = graph_precision(precision)
    return f"{kind}.onnx" if precision == FP32 else f"{kind}.{precision}.onnx"


def variant_files(kind: str, precision: str = FP32) -> list[str]:
    """Every name a graph of this kind and precision may have, today's first, then older releases'."""
    precision = graph_precision(precision)
    return [variant_file(kind, precision), *(f"{kind}.{old}.onnx" for old, new in OLD_TAGS.items() if new == precision)]


def all_variant_files(kinds=KINDS) -> set[str]:
    return {name for k in kinds for p in GRAPH_PRECISIONS for name in variant_files(k, p)}


def find_variant(export_dir: str | Path, kind: str, precision: str = FP32) -> Path | None:
    """The graph file of this kind and precision in an export directory (an older name too), or None."""
    return next((Path(export_dir) / n for n in variant_files(kind, precision) if (Path(export_dir) / n).is_file()),
                None)


def with_data(path: Path) -> list[Path]:
    """A graph file and its external-data file (<name>.data), if it has one."""
    return [p for p in (path, path.with_name(path.name + ".data")) if p.is_file()]


def check_precision(runtime: str, precision: str) -> str:
    from vdit_deploy.errors import VditError

    if precision not in RUNTIME_PRECISIONS[runtime]:
        raise VditError(f"{runtime} runtime precision must be one of {', '.join(RUNTIME_PRECISIONS[runtime])}, "
                        f"got {precision!r}")
    return precision


def runtime_graph(runtime: str, precision: str) -> str | None:
    """The graph precision `runtime` loads for its --precision (None: torch reads the checkpoint). Other
    names pass through: ONNX Runtime's missing-file error then lists the graphs the export has."""
    if runtime == "torch":
        return None
    return _LOADS[runtime].get(precision, precision)


def precisions_help() -> str:
    """The --precision help line of the sampling commands."""
    return "; ".join(f"{r}: {', '.join(p)}" for r, p in RUNTIME_PRECISIONS.items() if r != "ort-trt") + \
        " (ort int8 = int8-dynamic; trt int8 builds the int8-qdq graph; variants from `vdit calibrate`)."
