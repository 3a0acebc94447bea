"""TensorRT engines for an export, built once and cached (engine_cache.py holds the cache itself).

    vdit build EXPORT_DIR --precision fp16 --batch 1:2:8 [--seq 1:120:120]

builds step.onnx (the fused guided sampler step) and denoiser.onnx into <EXPORT_DIR>/engines, each
with a manifest (engine_cache.py) so a later build or `vdit sample --runtime trt` reuses it; and, where
the export has the VAE decoder (`vdit export-decoder`), decoder.onnx (+ decoder-chunk.onnx), whose
profile (decoder_profile) spans the frames of one video and the latent tile (the target's vae_tile) or
the whole latent: `--runtime trt` then decodes on TensorRT too (runtimes/trt_decoder.py).
One optimization profile covers every dynamic axis of every input: the batch, and each named axis of
the model contract (a text model's token count "seq" on its conditioning and on step.onnx's
null_<name> inputs alike), from the contract's range with opt = max unless --seq or the target says.
A cached engine is reused when its key (ONNX digest, contract, precision, profile, TensorRT version,
GPU and build options) matches; the build of one graph, and how precision works on each TensorRT
version, is trt_network.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vdit_deploy.errors import VditError
from vdit_deploy.export.variants import (BEST, DECODER, DECODER_CHUNK, DECODER_KINDS, DENOISER, FP16, INT8, STEP,
                                         STEP_HEAD, STEP_TAIL, variant_file, with_data)
from vdit_deploy.files import sha256_files
from vdit_deploy.runtimes.engine_cache import (AxisProfile, CachedEngine, EngineCache, EngineKey, EngineProfile,
                                               gpu_info, import_tensorrt)
from vdit_deploy.runtimes.trt_network import BuildOptions, build_engine, onnx_for, strongly_typed_only

KINDS = (STEP, DENOISER)   # build order: sampling needs the step engine, denoise() the other
CACHE_ENGINES = (STEP_HEAD, STEP_TAIL)   # step caching's, where the export has them (export --cache-split)


def onnx_digest(path: Path) -> str:
    """sha256 of an .onnx file and of its external-data file, if it has one (<name>.data)."""
    return sha256_files(with_data(path))


def graph_identity(onnx_path: Path, kind: str) -> tuple[str, dict | None]:
    """(what the engine key's `contract` holds, the inputs' axis names or None: the export's I/O spec):
    a denoiser graph's model contract digest; a decoder's VAE weights digest and decoder_axes."""
    if kind in DECODER_KINDS:
        from vdit_deploy.decode import read_decoder_meta

        meta = read_decoder_meta(onnx_path)
        return f"vae:{meta.checkpoint_sha256}", decoder_axes(meta)
    from vdit_deploy.export.metadata import read_metadata

    return read_metadata(onnx_path).contract.sha256(), None


def decoder_axes(meta) -> dict[str, list]:
    """A decoder graph's inputs -> per-dimension axis names, from the example shapes export_decoder traced
    (decode.EXAMPLE_HW latent pixels): "batch" (rows of latent frames, the frames layout), "h", "w", and
    "h*4" for a cache tensor at 4 x the latent resolution."""
    from vdit_deploy.decode import EXAMPLE_HW, FRAMES

    axes = {}
    for spec in meta.io["inputs"]:
        names = list(spec["shape"])
        if meta.layout == FRAMES:
            names[0] = "batch"
        for i, axis, size in ((-2, "h", EXAMPLE_HW[0]), (-1, "w", EXAMPLE_HW[1])):
            k, rest = divmod(int(spec["shape"][i]), size)
            if rest or not k:
                raise VditError(f"{meta.kind} input {spec['name']} {spec['shape']}: no multiple of the traced latent "
                                f"size {EXAMPLE_HW}; re-export the decoder with this vdit")
            names[i] = axis if k == 1 else f"{axis}*{k}"
        axes[spec["name"]] = names
    return axes


def decoder_profile(meta, latent, tile: int | None = None) -> EngineProfile:
    """The decoder engines' profile for the denoiser's latents (C, F, H, W): rows 1..F of latent frames
    (the frames layout; one video per call otherwise), h and w from 1 (tiles at the border) to the latent
    tile of `tile` output pixels (as decode.Decoder tiles), else the whole latent; opt = max."""
    from vdit_deploy.decode import FRAMES, Tiling

    _, f, h, w = (int(d) for d in latent)
    rows = AxisProfile(1, f, f) if meta.layout == FRAMES else AxisProfile.fixed(1)
    if tile:
        (th, *_), (tw, *_) = Tiling(**meta.tiling).plan(meta.ratio, Tiling(**meta.tiling).consistent(meta.ratio, tile))
        if h > th or w > tw:                    # diffusers tiles only latents larger than a tile
            h, w = min(h, th), min(w, tw)
    return EngineProfile.of(rows, {"h": AxisProfile(1, h, h), "w": AxisProfile(1, w, w)})


def decoder_precision(precision: str) -> str:
    """A VAE decoder is built at the denoiser's precision, fp16 for int8 and best (no Q/DQ decoder)."""
    return FP16 if precision in (INT8, BEST) else precision


def default_profile(meta, batch: AxisProfile | None = None, axes: dict | None = None) -> EngineProfile:
    """The profile of an export (its ExportMetadata): `batch` or the export's range with opt = min,
    max at most 8; each named axis of the contract from `axes`, else its whole range with opt = max
    (a text model is mostly run at the padded length), checked to lie inside the export's range."""
    if batch is None:
        lo, hi = meta.batch_range()
        batch = AxisProfile(lo, lo, min(hi, max(lo, 8)))
    contract = meta.contract
    axes = dict(axes or {})
    unknown = sorted(set(axes) - set(contract.axes))
    if unknown:
        raise VditError(f"the export has no {', '.join(unknown)} axis (its conditioning: {contract.describe_cond()})")
    ranges = {}
    for name, (lo, hi) in contract.axes.items():
        p = axes.get(name) or AxisProfile(lo, hi, hi)
        if p.min < lo or p.max > hi:
            raise VditError(f"--{name} {p} is outside the export's {name} range {lo}..{hi} "
                            f"(re-export with `vdit export --seq MIN:MAX`)")
        ranges[name] = p
    return EngineProfile.of(batch, ranges)


def ensure_engine(export: str | Path, kind: str, precision: str, profile: EngineProfile,
                  options: BuildOptions = BuildOptions(), cache_dir: str | Path | None = None,
                  build: bool = True, calibration=None, progress: bool = True,
                  log: Callable[[str], None] = print) -> tuple[CachedEngine, bool]:
    """The cached engine for (export, kind, contract, precision, profile) on this GPU and TensorRT,
    building it when missing or stale; with build=False a stale or missing engine is a one-line error.
    Returns (engine, whether it was built now)."""
    gpu = gpu_info()   # first: without a GPU, installing TensorRT would not help
    trt = import_tensorrt()
    export = Path(export)
    onnx_path = onnx_for(export, kind, precision, strongly_typed_only(trt))
    cache = EngineCache(cache_dir or (export if export.is_dir() else export.parent) / "engines")
    identity, axes = graph_identity(onnx_path, kind)
    key = EngineKey(onnx_digest(onnx_path), identity, precision,
                    str(profile), trt.__version__, gpu.name, gpu.compute_capability, options.to_dict())
    cached, why = cache.lookup(kind, key)
    if cached is not None:
        return cached, False
    if not build:
        raise VditError(f"{why}; run `vdit build` without --no-build to rebuild it")
    log(f"building {kind} engine ({precision}, batch {profile}) from {onnx_path.name} on {gpu.name}: {why}")
    engine, facts = build_engine(onnx_path, precision, profile, options, cache.timing_cache, calibration,
                                 progress, log, axis_names=axes)
    return cache.store(kind, key, engine, **facts), True


def find_engine(export: str | Path, kind: str, precision: str, build: bool = False, cache_dir=None,
                progress: bool = True, log: Callable[[str], None] = print) -> CachedEngine:
    """Any cached engine of this kind and precision that matches this GPU, TensorRT, ONNX and contract
    (whatever profile `vdit build` chose). None: a one-line error naming the `vdit build` to run, or
    with build=True (benchmarks, `vdit compare`) one is built with the export's default_profile."""
    from vdit_deploy.export.metadata import find_onnx, read_metadata

    gpu = gpu_info()
    trt = import_tensorrt()
    export = Path(export)
    onnx_path = onnx_for(export, kind, precision, strongly_typed_only(trt))
    cache = EngineCache(cache_dir or export / "engines")
    want = {"onnx_sha256": onnx_digest(onnx_path), "contract": graph_identity(onnx_path, kind)[0], "precision": precision,
            "tensorrt": trt.__version__, "gpu": gpu.name, "compute_capability": gpu.compute_capability}
    for entry in cache.entries():
        key = entry.key
        if entry.manifest.get("kind") == kind and all(getattr(key, k) == v for k, v in want.items()):
            cached, _ = cache.lookup(kind, key)   # re-checks the engine's sha256
            if cached is not None:
                return cached
    if not build:
        raise VditError(f"{export} has no {kind} engine for {precision} on this GPU and TensorRT {trt.__version__} "
                        f"(from {onnx_path.name}); run `vdit build {export} --precision {precision}` first")
    if kind in DECODER_KINDS:
        from vdit_deploy.decode import read_decoder_meta
        profile = decoder_profile(read_decoder_meta(onnx_path), read_metadata(find_onnx(export, STEP)).contract.latent)
    else:
        profile = default_profile(read_metadata(onnx_path))
    return ensure_engine(export, kind, precision, profile, cache_dir=cache_dir, progress=progress, log=log)[0]


@dataclass
class BuiltEngine:
    kind: str
    engine: CachedEngine
    built: bool          # False: the cache already held it
    precision: str
    profile: EngineProfile


def build_export(export: str | Path, precision: str | None = None, batch: str | None = None,
                 fixed_batch: int | None = None, target: str | Path | None = None, workspace_mb: int | None = None,
                 opt_level: int | None = None, cache_dir=None, build: bool = True, seq: str | None = None,
                 log: Callable[[str], None] = print) -> list[BuiltEngine]:
    """`vdit build`: every graph kind of an export dir to a cached engine. Explicit options win over the
    deployment profile `target` (its precision, batch and named-axis ranges, workspace, optimization
    level, DLA core), which wins over the defaults (fp16, batch 1:2:8 within the export's range, each named axis over the export's
    range with opt = max); with a target the memory plan is checked (and logged) before a long build
    that cannot fit the board."""
    from vdit_deploy.export.metadata import find_onnx, read_metadata
    from vdit_deploy.runtimes.profiles import load_profile, plan_for_export

    export = Path(export)
    if not export.is_dir():
        raise VditError(f"{export}: no such export directory (see `vdit export`)")
    if fixed_batch and batch:
        raise VditError("pass --batch or --fixed-batch, not both")
    board = load_profile(target) if target else None
    precision = precision or (board.precision if board else FP16)
    kinds = [k for k in (*KINDS, *CACHE_ENGINES) if (export / variant_file(k)).is_file()]   # cache: --cache-split
    if not kinds:
        raise VditError(f"{export} has no step.onnx or denoiser.onnx; run `vdit export` first")
    step_onnx = find_onnx(export, kinds[0])
    lo, hi = read_metadata(step_onnx).batch_range()
    batch_profile = (AxisProfile.fixed(fixed_batch) if fixed_batch else AxisProfile.parse(batch) if batch
                     else AxisProfile(*board.batch) if board else
                     AxisProfile(lo, min(max(lo, 2), hi), min(hi, max(lo, 8))))   # 1:2:8 within the export's
    if batch_profile.min < lo or batch_profile.max > hi:    # a fixed-batch family's graph has a static batch
        where = f"a fixed batch of {lo}" if lo == hi else f"batch {lo}..{hi}"
        raise VditError(f"batch {batch_profile} is outside the export's range ({where}): pass --batch or "
                        "--fixed-batch within it, or re-export with `vdit export --batch`")
    axes = {name: AxisProfile(*r) for name, r in (board.axes if board else {}).items()}
    if seq is not None:
        axes["seq"] = AxisProfile.parse(seq, "--seq")
    profile = default_profile(read_metadata(step_onnx), batch_profile, axes)
    options = BuildOptions(workspace_mb=workspace_mb or (board.workspace_mib if board else None),
                           opt_level=opt_level if opt_level is not None else (board.optimization_level if board else None),
                           dla_core=board.dla_core if board else None, target=board.name if board else None)
    if board:
        plan = plan_for_export(step_onnx, profile.batch.max, precision, board, dict(profile.axes))
        log(plan.table())
        plan.check()
    built = [BuiltEngine(kind, *ensure_engine(export, kind, precision, profile, options, cache_dir, build=build, log=log),
                         precision, profile) for kind in kinds]
    return built + decoder_engines(export, precision, read_metadata(step_onnx).contract.latent,
                                   board.vae_tile if board else None, options, cache_dir, build, log)


def decoder_engines(export: Path, precision: str, latent, tile: int | None, options: BuildOptions,
                    cache_dir=None, build: bool = True, log: Callable[[str], None] = print) -> list[BuiltEngine]:
    """The VAE decoder's engines where the export has decoder.onnx: [] without one, and [] with a one-line
    note when this TensorRT cannot build it at this precision (TensorRT 11 without decoder.fp16.onnx):
    `--runtime trt` then decodes on ONNX Runtime, saying so."""
    from vdit_deploy.decode import find_decoder, read_decoder_meta

    first = find_decoder(export)
    if first is None:
        return []
    meta = read_decoder_meta(first)
    meta.check_latent(latent)
    precision = decoder_precision(precision)
    profile = decoder_profile(meta, latent, tile)
    kinds = [DECODER] + ([DECODER_CHUNK] if (export / variant_file(DECODER_CHUNK)).is_file() else [])
    try:
        onnx_for(export, DECODER, precision, strongly_typed_only(import_tensorrt()))
    except VditError as e:
        log(f"note: the decoder is not built ({e}); --runtime trt decodes on ONNX Runtime")
        return []
    return [BuiltEngine(kind, *ensure_engine(export, kind, precision, profile, options, cache_dir, build=build, log=log),
                        precision, profile) for kind in kinds]


def calibration_cache(export: str | Path, calib_dir, batch: int = 2,
                      log: Callable[[str], None] = print) -> dict:
    """TensorRT 10.x implicit-INT8 calibration of the export's denoiser on a calibration set (checked
    to belong to this export first); returns the build facts (calibration_cache, ..._reused)."""
    from vdit_deploy.calibration.collect import load_calibration_set
    from vdit_deploy.export.metadata import find_onnx, read_metadata

    onnx_path = find_onnx(export, DENOISER)
    meta = read_metadata(onnx_path)
    load_calibration_set(calib_dir, meta.checkpoint_sha256, meta.contract)   # refuse a foreign set first
    lo, hi = meta.batch_range()
    _, facts = build_engine(onnx_path, INT8, default_profile(meta, AxisProfile(lo, min(max(batch, lo), hi), hi)),
                            calibration=calib_dir, log=log)
    return facts
