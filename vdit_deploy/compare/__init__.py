"""`vdit compare`: every runtime and precision side by side, latency and accuracy, in one command.

It spans the whole pipeline (export, calibration, runtimes, metrics, video), so it lives in the
package root beside sampling.py rather than in one stage's folder.

    source (model directory or export dir)
      -> artifacts.py: the file each runtime loads (model directory: exported + fp16/int8 variants under
         OUT/artifacts/<sha>, reused when the model's hash matches; export dir: used as it is)
      -> measure.py: the reference (torch:fp32; ort:fp32 when torch or the checkpoint is missing)
         samples every (batch, seed) and records each denoiser call's inputs and output; then every other
         runtime: load + first call, 1 warm-up sample, timed samples, then its denoiser on the
         reference's recorded inputs (teacher forcing: eps error per timestep without drift)
      -> machine.py: what it ran on, and each row's host and device memory
      -> report.py: report.json (SCHEMA_VERSION, docs/compare.md), report.md, latency.png,
         error_vs_timestep.png, samples.gif

All noise comes from the same seeded host generator (sampling.py) and video i of seed s takes row
(s + i) % rows of the conditioning (a class model's labels 0..classes-1, or the rows of a --cond
file: measure.videos_cond), so every runtime sees identical inputs. No torch import here: an edge box
compares ORT/TensorRT alone.
"""
from __future__ import annotations

import importlib
import shutil
from datetime import datetime, timezone
from pathlib import Path

from vdit_deploy.compare.artifacts import Artifacts, Target, parse_runtimes
from vdit_deploy.compare.machine import machine_info
from vdit_deploy.compare.measure import measure
from vdit_deploy.compare.report import SCHEMA_VERSION, format_table, write_outputs
from vdit_deploy.schedules import Schedule
from vdit_deploy.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, make_steps
from vdit_deploy.errors import VditError
from vdit_deploy.validate import INT32_MAX

__all__ = ["DEFAULT_RUNTIMES", "SCHEMA_VERSION", "Artifacts", "Target", "compare", "format_table", "parse_ints",
           "parse_runtimes"]

MAX_VALUES = 10_000             # --seeds / --batch values
DEFAULT_RUNTIMES = "torch:fp32,ort:fp32,ort:fp16,ort:int8,trt:fp16,trt:int8"
REFERENCES = (Target("torch", "fp32"), Target("ort", "fp32"))   # the first that runs is the reference


def parse_ints(text: str, what: str) -> list[int]:
    """'0-3' -> [0, 1, 2, 3]; '1,4' -> [1, 4]; ranges and lists mix ('0-1,5'). At most MAX_VALUES values
    (counted before a range is made into a list: 0-100000000 is refused at once)."""
    out = []
    try:
        for part in filter(None, (s.strip() for s in str(text).split(","))):
            lo, dash, hi = part.partition("-")
            lo, hi = int(lo), int(hi) if dash else int(lo)
            if not 0 <= lo <= hi <= INT32_MAX or len(out) + hi - lo + 1 > MAX_VALUES:
                raise VditError(f"{what} takes at most {MAX_VALUES} values, each 0..{INT32_MAX} (ranges LO-HI with "
                                f"LO <= HI); got {text[:60]!r}")
            out += range(lo, hi + 1)
    except ValueError:
        raise VditError(f"{what} takes integers like 0-3 or 1,4; got {text[:60]!r}") from None
    if not out:
        raise VditError(f"{what} is empty")
    return list(dict.fromkeys(out))


def check_sizes(source: Path, batches: list[int], seeds: list[int], sampler: str, steps: int | None) -> None:
    """Memory of the run, from the model's latent shape (config or export metadata, nothing loaded):
    the largest batch's loop, and the reference's recorded calls (x_t and out of every call, per seed)."""
    import math

    from vdit_deploy.config import check_memory

    latent = _latent(source)
    if latent is None:
        return
    calls = 1000 if sampler == "ddpm" else steps or DEFAULT_STEPS.get(sampler, 50)
    b = max(batches)
    recorded = len(seeds) * calls * b * math.prod(latent) * 4 * 4
    check_memory(32 * b * math.prod(latent) + recorded, f"comparing at batch {b} over {len(seeds)} seed(s)")


def _latent(source: Path):
    """(C, F, H, W) of a vdit checkpoint, a Latte directory or an export; None when it takes options."""
    from vdit_deploy.checkpoint import read_info
    from vdit_deploy.export.metadata import find_onnx, read_metadata
    from vdit_deploy.files import read_json

    if not source.is_dir() or not (source / "config.json").exists():
        return read_metadata(find_onnx(source)).contract.latent
    config = read_json(source / "config.json", "model config", root=source)
    if isinstance(config, dict) and "_class_name" in config:     # a diffusers model: sized when it loads
        return None
    return read_info(source).model.video_shape


def compare(source, out, runtimes: str | list[Target] = DEFAULT_RUNTIMES, steps: int | None = None,
            batches=(1, 4), seeds=(0, 1), sampler: str | None = None, eta: float = 0.0, guidance: float = 2.0,
            repeats: int = 5, threads: int | None = None, min_psnr: float = 30.0, progress: bool = True,
            log=print, command: str | None = None, cond=None, null=None, seq: tuple | None = None,
            cache: list[dict] | None = None) -> dict:
    """Run the comparison and write report.json, report.md, the plots and the GIF under `out`.
    cond: the conditioning rows the videos take in turn (a .safetensors file or a dict; needed for a
    model that is not class-conditioned); default: a class model's labels. null, seq: a diffusers
    model directory's null conditioning (.safetensors) and token range, as `vdit export --null --seq`.
    cache: step-caching settings (cache_rows.parse_cache): rows per runtime and setting against that
    runtime uncached. A refusal leaves no `out` behind when there was none."""
    from tqdm import tqdm

    from vdit_deploy.runtimes.base import RUNTIMES

    source, out = Path(source), Path(out)
    if not source.exists():
        raise VditError(f"{source}: no such checkpoint or export directory")
    # a bad sampler, order or step count fails before any export (euler, flow models' only, on the model's schedule)
    if sampler != "euler":
        make_steps(Schedule(), sampler or DEFAULT_SAMPLER, steps, eta)
    targets = parse_runtimes(runtimes) if isinstance(runtimes, str) else list(runtimes)
    batches, seeds = sorted(set(batches)), list(seeds)
    if min(batches) < 1 or repeats < 1:
        raise VditError("batch sizes and --repeats must be >= 1")
    check_sizes(source, batches, seeds, sampler, steps)     # before anything is exported or run
    torch_ref, ort_ref = REFERENCES
    targets = [torch_ref] + [t for t in targets if t != torch_ref]   # the reference runs, asked for or not
    if threads:   # torch (now or when it loads) and every ONNX Runtime session
        from vdit_deploy.threads import configure
        configure(threads)
    for t in targets:   # load backends before any memory baseline, so no row pays for an import
        try:
            importlib.import_module(RUNTIMES[t.runtime][0])
        except ImportError:
            pass
    if cond is not None and not isinstance(cond, dict) and not Path(cond).is_file():
        raise VditError(f"{cond}: no such conditioning file")
    fresh = not out.exists()
    try:
        arts = Artifacts(source, out, targets, batches, sampler, steps, eta, guidance, seeds, log=log, cond=cond,
                         model_options={"null_file": null, "seq": seq}, cache_split=1 if cache else None)
        sampler, steps = arts.calib["sampler"], arts.calib["steps"]     # None: the model's pipeline's
    except BaseException:     # a refusal (or Ctrl-C) while exporting or checking: no half-made report dir
        if fresh and out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        raise
    skipped, rows, done = dict(arts.skipped), [], set()
    recorded = {}   # {batch: {seed: (video, denoiser calls)}}: the reference's, what the others are scored on
    bar = tqdm(total=len(targets) * len(batches), desc="compare", unit="run", disable=not progress)

    def run(target: Target, record: bool = False) -> bool:
        """Measure `target` at every batch -> whether it ran. Failing at the first batch skips it, with
        the reason; failing at a later one fails that row only."""
        done.add(target)
        if target not in targets:   # the fall-back reference, run for the purpose
            bar.total += len(batches)
        if target in skipped:
            bar.update(len(batches))
            return False
        options = {"threads": threads} if threads and target.runtime in ("ort", "ort-trt") else {}
        for batch in batches:
            bar.set_postfix_str(f"{target.label} batch {batch}")
            try:
                row = measure(target, arts.opener(target, options), batch, seeds, sampler, steps, eta, guidance,
                              repeats, recorded.get(batch, {}), arts.pool, record=record)
            except Exception as e:   # a backend's own error types too: one row fails, the rest go on
                first_line = (str(e).splitlines() or [""])[0]
                reason = str(e) if isinstance(e, VditError) else f"{type(e).__name__}: {first_line}"
                if batch == batches[0]:
                    skipped[target] = reason
                    bar.update(len(batches))
                    return False
                row = {"runtime": target.runtime, "precision": target.precision, "label": target.label,
                       "batch": batch, "status": "failed", "reason": reason}
            if "_recorded" in row:
                recorded[batch] = row.pop("_recorded")
            rows.append(row)
            bar.update(1)
        return True

    # the reference first, chosen explicitly: torch:fp32, else ort:fp32; then every other target in order
    reference = next((r for r in REFERENCES if run(r, record=True)), None)
    for target in targets:
        if target not in done:
            run(target)
    cache_rows = []
    for target in (t for t in targets if cache and t not in skipped and t.runtime in ("ort", "torch", "trt")):
        from vdit_deploy.compare.cache_rows import measure_cache
        options = {"threads": threads} if threads and target.runtime == "ort" else {}
        for batch in batches:
            try:
                cache_rows += measure_cache(target.label, arts.opener(target, options), batch, seeds, sampler, steps,
                                            eta, guidance, repeats, arts.pool, cache, fit_dir=arts.export)
            except VditError as e:     # no split graphs, a runtime without caching: that runtime's rows say so
                cache_rows += [{"label": target.label, "batch": batch, "setting": s, "status": "skipped",
                                "reason": str(e)} for s in cache]
    bar.close()
    notes = []
    if reference == ort_ref:
        notes.append(f"reference is ort:fp32: torch:fp32 is unavailable ({skipped[torch_ref]})")
    elif reference is None:
        notes.append("no reference could run (torch:fp32 and ort:fp32 both skipped): accuracy is empty")
    for row in rows:
        acc = row.get("accuracy")
        if acc and not acc["reference"]:   # non-finite videos are below any threshold
            acc["below_threshold"] = not acc["finite"] or (acc["psnr_db"] is not None and acc["psnr_db"] < min_psnr)
    report = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "source": {"path": str(source.resolve()), "kind": arts.kind,
                   "checkpoint": str(arts.checkpoint) if arts.checkpoint else None,
                   "checkpoint_sha256": arts.sha, "export_dir": str(arts.export)},
        "settings": {"sampler": sampler, "steps": steps, "eta": eta, "guidance": guidance, "batches": batches,
                     "seeds": seeds, "warmup": 1,
                     "conditioning": f"row (seed + i) % rows of {Path(cond).resolve()} for video i"
                     if isinstance(cond, (str, Path)) else "class label (seed + i) % classes for video i"
                     if cond is None else "row (seed + i) % rows of the given conditioning for video i",
                     "repeats": repeats, "threads": threads, "min_psnr_db": min_psnr,
                     "calibration_seeds": arts.calib["seeds"]},
        "reference": reference.label if reference else None, "notes": notes, "machine": machine_info(),
        "results": rows, **({"cache": cache_rows} if cache else {}), "skipped": [{"runtime": t.runtime, "precision": t.precision, "label": t.label,
                                      "reason": r} for t, r in skipped.items()],
    }
    write_outputs(report, out, gif_decoder(arts, source))
    return report


def gif_decoder(arts: Artifacts, source: Path):
    """(decoder, its name) turning the samples' latents into samples.gif's frames, or None (latents as
    they are): the export's decoder.onnx in ONNX Runtime, else a diffusers transformer's pipeline ../vae."""
    from vdit_deploy.decode import Decoder, find_decoder

    if find_decoder(arts.export) is not None:
        return Decoder(arts.export), f"{find_decoder(arts.export).name} (ONNX Runtime)"
    vae = source.parent / "vae"
    if arts.kind == "checkpoint" and (vae / "config.json").is_file():    # a model directory: torch is here
        from vdit_deploy.sources import is_diffusers_dir
        if is_diffusers_dir(source):
            from vdit_deploy.export.decoder_export import TorchDecoder
            return TorchDecoder(vae), f"diffusers' {vae}"
    return None
