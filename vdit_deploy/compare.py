"""`vdit compare`: every runtime and precision side by side, latency and accuracy, in one command.

It spans the whole pipeline (export, calibration, runtimes, metrics, video), so it lives in the
package root beside sampling.py rather than in one stage's folder.

    source (checkpoint or export dir)
      -> artifacts (checkpoint: exported + fp16/int8 variants under OUT/artifacts/<sha>, reused when the
         checkpoint hash matches; export dir: used as it is)
      -> the reference (torch:fp32; ort:fp32 when torch or the checkpoint is missing) samples every
         (batch, seed) and records each denoiser call's inputs and eps
      -> every other runtime: load + first call, 1 warm-up sample, timed samples, then its denoiser on
         the reference's recorded inputs (teacher forcing: eps error per timestep without drift)
      -> report.json (SCHEMA_VERSION, docs/compare.md), report.md, latency.png, error_vs_timestep.png,
         samples.gif

All noise comes from the same seeded host generator (sampling.py) and labels are (seed + i) % classes,
so every runtime sees identical inputs. No torch import here: an edge box compares ORT/TensorRT alone.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from vdit_deploy.diffusion import DEFAULT_SAMPLER, DEFAULT_STEPS, Schedule, make_steps
from vdit_deploy.errors import VditError
from vdit_deploy.files import atomic_path, sha256_file
from vdit_deploy.metrics import max_abs, psnr, rel_l2, ssim
from vdit_deploy.plots import plot_error_vs_timestep, pyplot, save

SCHEMA_VERSION = 1
DEFAULT_RUNTIMES = "torch:fp32,ort:fp32,ort:fp16,ort:int8,trt:fp16,trt:int8"
REFERENCES = ("torch:fp32", "ort:fp32")          # in order of preference
CALIBRATION_SEED_OFFSET = 1000                   # calibrate on other seeds than the ones evaluated


@dataclass(frozen=True)
class Target:
    runtime: str       # a RUNTIMES name
    precision: str

    @property
    def label(self) -> str:
        return f"{self.runtime}:{self.precision}"


# ---- parsing the command line's lists -----------------------------------------------------------
def parse_runtimes(text: str) -> list[Target]:
    from vdit_deploy.runtimes.base import check_runtime_name

    targets = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, precision = item.partition(":")
        target = Target(check_runtime_name(name), precision or "fp32")
        if target not in targets:
            targets.append(target)
    if not targets:
        raise VditError("--runtimes is empty; e.g. torch:fp32,ort:fp16")
    return targets


def parse_ints(text: str, what: str) -> list[int]:
    """'0-3' -> [0, 1, 2, 3]; '1,4' -> [1, 4]; ranges and lists mix ('0-1,5')."""
    out = []
    try:
        for part in filter(None, (s.strip() for s in str(text).split(","))):
            lo, dash, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    except ValueError:
        raise VditError(f"{what} takes integers like 0-3 or 1,4; got {text!r}") from None
    if not out:
        raise VditError(f"{what} is empty")
    return list(dict.fromkeys(out))


# ---- the machine ----------------------------------------------------------------------------------
def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def nvidia_smi(query: str, kind: str = "gpu") -> list[list[str]]:
    """Rows of `nvidia-smi --query-<kind>=<query>` ([] without a driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", f"--query-{kind}={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        pass
    gpus = [{"name": r[0], "driver": r[1], "memory_mb": float(r[2])}
            for r in nvidia_smi("name,driver_version,memory.total") if len(r) == 3]
    libs = {"numpy": np.__version__, "onnx": _version("onnx"),
            "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"),
            "torch": _version("torch"), "tensorrt": _version("tensorrt", "tensorrt-cu12"),
            "cuda-python": _version("cuda-python"), "vdit-deploy": _version("vdit-deploy")}
    try:
        import onnxruntime as ort
        libs["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
            if hasattr(os, "sysconf") else None,
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,   # others' CPU use
            "gpus": gpus, "os": platform.platform(), "python": platform.python_version(), "libraries": libs}


# ---- memory ---------------------------------------------------------------------------------------
def _status_kb(key: str) -> int | None:
    try:
        return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return None


class PeakRss:
    """Peak resident memory of this process between start() and stop(), and its growth over what was
    resident at start().

    Linux: VmHWM (the kernel's RSS high-water mark) reset through /proc/self/clear_refs before the block,
    after freed heap went back to the OS (malloc_trim), so each runtime is measured from its own start.
    Elsewhere: getrusage's ru_maxrss, a lifetime peak that cannot be reset (the method says so)."""

    def start(self) -> "PeakRss":
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            torch.cuda.empty_cache()   # the previous row's cached blocks are not this row's memory
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.start_kb = _status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM delta (Linux /proc, reset per runtime)"
        except OSError:
            self.start_kb, self.method = None, "ru_maxrss (process lifetime peak, not reset)"
        return self

    def stop(self) -> dict:
        if self.start_kb is not None:
            self.peak_kb = _status_kb("VmHWM")
        else:
            scale = 1 if sys.platform == "darwin" else 1024   # macOS reports bytes, Linux kB
            self.peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale // 1024
        delta = None if self.start_kb is None else (self.peak_kb - self.start_kb) / 1024
        return {"host_peak_rss_mb": self.peak_kb / 1024, "host_rss_delta_mb": delta, "host_method": self.method}


def device_memory_mb() -> float | None:
    """GPU memory this process holds now (nvidia-smi per process: CUDA context + allocations)."""
    used = [float(r[1]) for r in nvidia_smi("pid,used_memory", "compute-apps")
            if len(r) == 2 and r[0] == str(os.getpid()) and r[1].replace(".", "").isdigit()]
    return sum(used) if used else None


# ---- artifacts ------------------------------------------------------------------------------------
def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _export_covers(export_dir: Path, sha: str, max_batch: int) -> bool:
    from vdit_deploy.export.metadata import read_metadata

    try:
        meta = read_metadata(export_dir / "denoiser.onnx")
    except VditError:
        return False
    lo, hi = meta.batch_range()
    return meta.checkpoint_sha256 == sha and lo <= 1 and hi >= 2 * max_batch


def _probe(target: Target) -> None:
    """Fail fast, with the runtime's own one-line reason, before building variants it could not run."""
    if target.runtime == "trt":
        from vdit_deploy.runtimes.engine_cache import gpu_info, import_tensorrt
        gpu_info()
        import_tensorrt()
    elif target.runtime == "ort-trt":
        from vdit_deploy.runtimes.ort_runtime import resolve_providers
        resolve_providers(["tensorrt", "cuda"])


class Artifacts:
    """Where each runtime's artifact lives; targets that cannot get one are `skipped` with the reason."""

    def __init__(self, source: Path, out: Path, targets: list[Target], batches: list[int], sampler: str,
                 steps: int, eta: float, guidance: float, seeds: list[int], log=print):
        from vdit_deploy.export.metadata import find_onnx, read_metadata

        self.source, self.log = source, log
        self.skipped: dict[Target, str] = {}
        self.notes: list[str] = []
        if _is_checkpoint(source):
            self.kind, self.checkpoint = "checkpoint", source
            self.sha = sha256_file(source / "model.safetensors")
            self.export = out / "artifacts" / self.sha[:16]
            if all(t.runtime == "torch" for t in targets):
                pass                                   # nothing to export
            elif not _export_covers(self.export, self.sha, max(batches)):
                try:
                    from vdit_deploy.export.onnx_export import export_checkpoint
                except ImportError:
                    raise VditError("comparing ONNX/TensorRT runtimes from a checkpoint exports it, which needs "
                                    "torch: pip install 'vdit-deploy[torch]', or pass an export directory") from None
                log(f"exporting {source} -> {self.export}")
                export_checkpoint(source, self.export, batch=(1, max(8, max(batches))))
            else:
                log(f"reusing {self.export} (checkpoint sha256 {self.sha[:12]} matches)")
        else:
            self.kind, self.export = "export", source
            meta = read_metadata(find_onnx(source))   # a one-line error when it is neither
            self.sha = meta.checkpoint_sha256
            ckpt = Path(meta.checkpoint_path) if meta.checkpoint_path else None
            if ckpt is None or not (ckpt / "model.safetensors").is_file():
                self.checkpoint, why = None, f"the export's source checkpoint {ckpt or '(not recorded)'} is not there"
            elif sha256_file(ckpt / "model.safetensors") != self.sha:
                self.checkpoint, why = None, f"{ckpt} has changed since the export (sha256 differs)"
            else:
                self.checkpoint, why = ckpt, ""
            if self.checkpoint is None:
                for t in targets:
                    if t.runtime == "torch":
                        self.skipped[t] = f"needs the checkpoint: {why}"
        self.calib = dict(sampler=sampler, steps=steps, eta=eta, guidance=guidance,
                          seeds=[CALIBRATION_SEED_OFFSET + s for s in seeds[:2]])
        if self.kind == "checkpoint":
            for t in targets:
                if t not in self.skipped:
                    self._variant(t)

    def path(self, target: Target) -> Path:
        return self.checkpoint if target.runtime == "torch" else self.export

    def _variant(self, target: Target) -> None:
        """Build the ONNX precision variant `target` reads (checkpoint sources only; cached by name)."""
        if target.runtime == "torch" or target.precision == "fp32":
            return
        try:
            _probe(target)
        except VditError as e:
            self.skipped[target] = str(e)
            return
        try:
            if target.precision == "fp16":
                if not (self.export / "denoiser.fp16.onnx").is_file():
                    from vdit_deploy.calibration.fp16 import convert_fp16
                    self.log("converting to fp16")
                    convert_fp16(self.export, self._calibration_set())   # refused if it makes inf/NaN
            elif target.precision == "int8":
                mode = "qdq" if target.runtime == "trt" else "dynamic"   # dynamic: ORT's fast CPU form
                name = "denoiser.int8-qdq.onnx" if mode == "qdq" else "denoiser.int8.onnx"
                if not (self.export / name).is_file():
                    from vdit_deploy.calibration.int8 import quantize_int8
                    self.log(f"quantizing to int8 ({mode})")
                    quantize_int8(self.export, self._calibration_set(), mode=mode)
        except ImportError as e:
            self.skipped[target] = f"cannot build its {target.precision} graph: {e} (see `vdit calibrate`)"
        except VditError as e:
            self.skipped[target] = f"cannot build its {target.precision} graph: {e}"

    def _calibration_set(self) -> Path:
        """Activations from the same sampler settings as the comparison (other seeds), collected once."""
        c = self.calib
        calib_dir = self.export / f"calib-{c['sampler']}{c['steps']}-g{c['guidance']:g}-eta{c['eta']:g}"
        if not calib_dir.is_dir():
            from vdit_deploy.calibration.collect import collect
            self.log(f"collecting a calibration set -> {calib_dir}")
            collect(self.checkpoint or self.export, calib_dir, sampler=c["sampler"], steps=c["steps"],
                    guidance=c["guidance"], eta=c["eta"], seeds=c["seeds"], timesteps=min(8, c["steps"]))
        return calib_dir


def artifact_files(rt, target: Target, artifact: Path) -> list[Path]:
    """The files the opened runtime actually loaded (weights, graphs, engines), with external data."""
    if target.runtime == "torch":
        return [Path(artifact) / "model.safetensors"]
    files = []
    for attr in ("graph", "fused", "step_engine", "_denoiser"):
        path = getattr(getattr(rt, attr, None), "path", None)
        if path is not None:
            files += [Path(path), *sorted(Path(path).parent.glob(Path(path).name + ".data"))]
    return files


# ---- measuring one runtime ------------------------------------------------------------------------
def stats(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "min": float(v.min()),
            "max": float(v.max()), "mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def labels_for(seed: int, batch: int, num_classes: int) -> np.ndarray:
    return np.array([(seed + i) % num_classes for i in range(batch)], np.int32)


def measure(target: Target, artifact: Path, batch: int, seeds: list[int], sampler: str, steps: int,
            eta: float, guidance: float, repeats: int, reference: dict, options: dict,
            record: bool = False) -> dict:
    """One (runtime, batch) row. `reference`: {seed: (video, recorded calls)} from the reference run
    ({} when there is none). record=True: this run is the reference; it records its denoiser calls and
    returns them under "_recorded"."""
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import DenoiseRecorder, SampleTimes, sample

    row = {"runtime": target.runtime, "precision": target.precision, "label": target.label, "batch": batch}
    mem = PeakRss().start()
    device_before = device_memory_mb()
    start = time.perf_counter()
    rt = open_runtime(target.runtime, artifact, precision=target.precision, **options)
    try:
        load_s = time.perf_counter() - start
        cfg = rt.config
        plan = make_steps(rt.schedule, sampler, None if sampler == "ddpm" else steps, eta)
        # first call: one step at this batch (engine/graph set-up happens here, not in the timings)
        x = np.random.default_rng(0).standard_normal((batch, *cfg.video_shape), dtype=np.float32)
        start = time.perf_counter()
        np.asarray(rt.step(x, plan[0].t, labels_for(seeds[0], batch, cfg.num_classes), guidance,
                           plan[0].coefs, np.zeros_like(x)))
        first_s = time.perf_counter() - start
        sample(rt, cfg, labels_for(seeds[0], batch, cfg.num_classes), plan, guidance, seeds[0])  # warm-up
        totals, step_s, videos = [], [], {}
        for i in range(max(repeats, len(seeds))):   # every seed at least once; its video is kept
            seed = seeds[i % len(seeds)]
            times = SampleTimes()
            video = sample(rt, cfg, labels_for(seed, batch, cfg.num_classes), plan, guidance, seed,
                           times=times)
            totals.append(times.total)
            step_s += times.steps
            videos.setdefault(seed, video)
        # memory of load + runs, before the reference's recordings (kept for the others) are made
        memory = mem.stop()
        device_mb = device_memory_mb()
        recorded, denoise_s, eps_err = {}, [], []
        for seed in seeds:
            if record:              # the reference: record each denoiser call's inputs and eps
                rec = DenoiseRecorder(rt.denoise)
                sample(rec, cfg, labels_for(seed, batch, cfg.num_classes), plan, guidance, seed)
                recorded[seed] = [call[1:] for call in rec.calls]
                denoise_s += rec.seconds
            elif seed in reference:  # teacher forcing: this runtime's eps on the reference's inputs
                errs = []
                for x_in, t_in, y_in, eps_ref in reference[seed][1]:
                    start = time.perf_counter()
                    eps = rt.denoise(x_in, t_in, y_in)
                    denoise_s.append(time.perf_counter() - start)
                    errs.append(rel_l2(eps, eps_ref))
                eps_err.append(errs)
        files = artifact_files(rt, target, artifact)
        row["describe"] = rt.describe()
        row["graph_precision"] = rt.precision
    finally:
        rt.close()
    denoise_batch = batch if guidance == 1.0 else 2 * batch
    sample_stats = stats(totals)
    row.update({
        "status": "ok", "reason": None,
        "artifact": {"files": [str(f) for f in files], "bytes": int(sum(f.stat().st_size for f in files))},
        "startup": {"load_s": load_s, "first_call_s": first_s, "total_s": load_s + first_s},
        "latency": {"sample_s": sample_stats, "step_ms": stats(np.multiply(step_s, 1e3)),
                    "denoise_ms": stats(np.multiply(denoise_s, 1e3)), "denoise_batch": denoise_batch},
        "throughput_videos_per_s": batch / sample_stats["median"],
        "memory": {**memory, "device_mb": device_mb,
                   "device_delta_mb": None if device_mb is None else device_mb - (device_before or 0.0),
                   "device_method": "nvidia-smi used_memory of this process after the runs "
                                    "(allocator pools and engine buffers stay allocated: the row's peak)"},
        "timesteps": [s.t for s in plan],
    })
    if record:
        row["accuracy"] = {"reference": True}
        row["_recorded"] = {seed: (videos[seed], recorded[seed]) for seed in seeds}
    else:
        row["accuracy"] = accuracy(videos, {s: reference[s][0] for s in seeds}, eps_err, seeds) \
            if all(s in reference for s in seeds) else None
    row["_video"] = videos[seeds[0]][0]
    return row


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None   # JSON has no inf: null PSNR means bit-identical


def accuracy(videos: dict, refs: dict, eps_err: list[list[float]], seeds: list[int]) -> dict:
    per_seed = []
    for seed in seeds:
        got, ref = videos[seed], refs[seed]
        h, w = got.shape[-2:]
        per_seed.append({"seed": seed, "psnr_db": _finite(psnr(got, ref)),
                         "ssim": ssim(got, ref) if min(h, w) >= 7 else None,
                         "max_abs": max_abs(got, ref), "video_rel_l2": rel_l2(got, ref)})
    err = np.asarray(eps_err, np.float64)           # (seeds, steps)
    psnrs = [s["psnr_db"] for s in per_seed]
    ssims = [s["ssim"] for s in per_seed if s["ssim"] is not None]
    return {"reference": False,
            "psnr_db": None if all(p is None for p in psnrs) else min(p for p in psnrs if p is not None),
            "ssim": min(ssims) if ssims else None,
            "max_abs": max(s["max_abs"] for s in per_seed),
            "video_rel_l2": max(s["video_rel_l2"] for s in per_seed),
            "eps_rel_l2_mean": float(err.mean()), "eps_rel_l2_max": float(err.max()),
            "eps_rel_l2_per_step": err.mean(axis=0).tolist(), "per_seed": per_seed}


# ---- the whole comparison -------------------------------------------------------------------------
def compare(source, out, runtimes: str | list[Target] = DEFAULT_RUNTIMES, steps: int | None = None,
            batches=(1, 4), seeds=(0, 1), sampler: str = DEFAULT_SAMPLER, eta: float = 0.0, guidance: float = 2.0,
            repeats: int = 5, threads: int | None = None, min_psnr: float = 30.0, progress: bool = True,
            log=print, command: str | None = None) -> dict:
    """Run the comparison and write report.json, report.md, the plots and the GIF under `out`."""
    from tqdm import tqdm

    from vdit_deploy.runtimes.base import RUNTIMES

    source, out = Path(source), Path(out)
    if not source.exists():
        raise VditError(f"{source}: no such checkpoint or export directory")
    make_steps(Schedule(), sampler, steps, eta)      # a bad sampler, order or step count fails before any export
    steps = DEFAULT_STEPS.get(sampler) if steps is None else steps
    targets = parse_runtimes(runtimes) if isinstance(runtimes, str) else list(runtimes)
    batches, seeds = sorted(set(batches)), list(seeds)
    if min(batches) < 1 or repeats < 1:
        raise VditError("batch sizes and --repeats must be >= 1")
    # the reference always runs: torch:fp32 (added when not asked for), else ort:fp32 (added if needed)
    torch_ref, ort_ref = (Target(*r.split(":")) for r in REFERENCES)
    if torch_ref not in targets:
        targets.insert(0, torch_ref)
    if threads and importlib.util.find_spec("torch") and any(t.runtime == "torch" for t in targets):
        import torch
        torch.set_num_threads(threads)
    for t in targets:   # load backends before any memory baseline, so no row pays for an import
        try:
            importlib.import_module(RUNTIMES[t.runtime][0])
        except ImportError:
            pass
    arts = Artifacts(source, out, targets, batches, sampler, steps, eta, guidance, seeds, log=log)
    skipped = dict(arts.skipped)
    rows, reference, ref_label, notes = [], {}, None, list(arts.notes)
    order = [torch_ref] + [t for t in targets if t != torch_ref]
    bar = tqdm(total=len(order) * len(batches), desc="compare", unit="run", disable=not progress)
    i = 0
    while i < len(order):
        target, i = order[i], i + 1
        is_ref = ref_label is None and target.label in REFERENCES
        if target not in skipped:
            options = {"threads": threads} if threads and target.runtime in ("ort", "ort-trt") else {}
            for batch in batches:
                bar.set_postfix_str(f"{target.label} batch {batch}")
                try:
                    row = measure(target, arts.path(target), batch, seeds, sampler, steps, eta, guidance,
                                  repeats, reference.get(batch, {}), options, record=is_ref)
                except Exception as e:   # a backend's own error types too: one row fails, the rest go on
                    reason = str(e) if isinstance(e, VditError) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    if batch == batches[0]:     # could not open or run at all: skipped, with its reason
                        skipped[target] = reason
                        bar.update(len(batches))
                        break
                    row = {"runtime": target.runtime, "precision": target.precision, "label": target.label,
                           "batch": batch, "status": "failed", "reason": reason}
                if "_recorded" in row:
                    reference[batch] = row.pop("_recorded")
                rows.append(row)
                bar.update(1)
        else:
            bar.update(len(batches))
        if is_ref and target not in skipped:
            ref_label = target.label
            if target == ort_ref:
                notes.append(f"reference is ort:fp32: torch:fp32 is unavailable ({skipped[torch_ref]})")
        elif target == torch_ref and ort_ref not in order:   # fall back to ort:fp32, added for the purpose
            bar.total += len(batches)
            order.insert(i, ort_ref)
    bar.close()
    if ref_label is None:
        notes.append("no reference could run (torch:fp32 and ort:fp32 both skipped): accuracy is empty")
    for row in rows:
        acc = row.get("accuracy")
        if acc and not acc.get("reference"):
            acc["below_threshold"] = acc["psnr_db"] is not None and acc["psnr_db"] < min_psnr
    report = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "source": {"path": str(source.resolve()), "kind": arts.kind,
                   "checkpoint": str(arts.checkpoint) if arts.checkpoint else None,
                   "checkpoint_sha256": arts.sha, "export_dir": str(arts.export)},
        "settings": {"sampler": sampler, "steps": steps, "eta": eta, "guidance": guidance, "batches": batches,
                     "seeds": seeds, "labels": "(seed + i) % num_classes for video i", "warmup": 1,
                     "repeats": repeats, "threads": threads, "min_psnr_db": min_psnr,
                     "calibration_seeds": arts.calib["seeds"]},
        "reference": ref_label, "notes": notes, "machine": machine_info(),
        "results": rows, "skipped": [{"runtime": t.runtime, "precision": t.precision, "label": t.label,
                                      "reason": r} for t, r in skipped.items()],
    }
    write_outputs(report, out)
    return report


# ---- outputs --------------------------------------------------------------------------------------
COLUMNS = ("runtime", "batch", "start s", "step ms p50/p90", "sample s p50±sd", "video/s", "RSS MB",
           "size MB", "eps relL2", "PSNR dB", "SSIM", "max err")


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def table_rows(report: dict) -> list[tuple[list[str], bool]]:
    """(cells, below threshold) per result row."""
    out = []
    for r in report["results"]:
        if r["status"] != "ok":
            out.append(([r["label"], str(r["batch"]), f"failed: {r['reason']}"], True))
            continue
        lat, acc, mem = r["latency"], r["accuracy"], r["memory"]
        ref = "ref" if acc and acc["reference"] else ("-" if acc is None else "")
        acc = acc or {}
        psnr_cell = ref or ("identical" if acc["psnr_db"] is None else f"{acc['psnr_db']:.1f}")
        out.append(([r["label"], str(r["batch"]), f"{r['startup']['total_s']:.2f}",
                     f"{lat['step_ms']['median']:.1f}/{lat['step_ms']['p90']:.1f}",
                     f"{lat['sample_s']['median']:.2f}±{lat['sample_s']['std']:.2f}",
                     f"{r['throughput_videos_per_s']:.2f}",
                     _fmt(mem["host_rss_delta_mb"] if mem["host_rss_delta_mb"] is not None
                          else mem["host_peak_rss_mb"], ".0f"),
                     f"{r['artifact']['bytes'] / 1e6:.1f}",
                     ref or f"{acc['eps_rel_l2_mean']:.1e}", psnr_cell, ref or _fmt(acc["ssim"], ".4f"),
                     ref or f"{acc['max_abs']:.1e}"], bool(acc.get("below_threshold"))))
    return out


def format_table(report: dict, color: bool = True) -> str:
    import click

    rows = table_rows(report)
    widths = [max([len(c)] + [len(cells[i]) for cells, _ in rows if i < len(cells)]) for i, c in enumerate(COLUMNS)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [line(COLUMNS)]
    for cells, bad in rows:
        text = line(cells) if len(cells) == len(COLUMNS) else "  ".join(cells)
        lines.append(click.style(text, fg="red") if bad and color else text)
    for s in report["skipped"]:
        lines.append(f"{s['label']:<{widths[0]}}  skipped: {s['reason']}")
    return "\n".join(lines)


def format_markdown(report: dict, plots: dict) -> str:
    m, s = report["machine"], report["settings"]
    gpu = ", ".join(f"{g['name']} (driver {g['driver']})" for g in m["gpus"]) or "none"
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v and k != "onnxruntime_providers")
    md = [f"# vdit compare ({report['created']})", "",
          f"- source: `{report['source']['path']}` ({report['source']['kind']}, checkpoint sha256 "
          f"`{report['source']['checkpoint_sha256'][:12]}`)",
          f"- machine: {m['cpu']}, {m['cpu_cores_usable']}/{m['cpu_cores']} cores usable, "
          f"{m['memory_gb']} GB RAM, GPU: {gpu}, load average {_fmt(m['load_average_1m'], '.1f')} at start",
          f"- libraries: {libs}",
          f"- sampling: {s['sampler']} {s['steps']} steps, eta {s['eta']:g}, guidance {s['guidance']:g}, "
          f"seeds {s['seeds']}, batches {s['batches']}, {s['repeats']} timed runs after 1 warm-up, "
          f"threads {s['threads'] or 'runtime default'}",
          f"- reference: {report['reference']}; rows marked **below** have PSNR < {s['min_psnr_db']:g} dB", ""]
    md += [f"- note: {n}" for n in report["notes"]]
    md += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for cells, bad in table_rows(report):
        cells = cells + [""] * (len(COLUMNS) - len(cells))
        if bad:
            cells[0] = f"**{cells[0]}** (below)"
        md.append("| " + " | ".join(cells) + " |")
    for sk in report["skipped"]:
        md.append(f"| {sk['label']} | | skipped: {sk['reason']} |" + " |" * (len(COLUMNS) - 3))
    md += ["", "start s: load + first call. step: one guided sampler step (one denoiser call on the "
           "cond+null batch + the update). sample: a full sample of `batch` videos. RSS MB: growth of the "
           "process's peak resident memory over load + all runs. size MB: the files the runtime loaded (an export's "
           "fused step.onnx holds a second copy of the weights). eps relL2: mean over steps and seeds of "
           "the denoiser's relative L2 error on the reference's inputs. PSNR/SSIM/max err: final videos "
           "against the reference's, worst seed.", ""]
    for name, path in plots.items():
        if path:
            md.append(f"![{name}]({Path(path).name})")
    if report.get("gif_columns"):
        md.append(f"\nsamples.gif columns, left to right: {', '.join(report['gif_columns'])}")
    return "\n".join(md) + "\n"


def write_outputs(report: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in report["results"] if r["status"] == "ok"]
    files = {"json": "report.json", "markdown": "report.md", "latency_plot": None, "error_plot": None,
             "gif": None}
    try:
        files["latency_plot"] = plot_latency(ok, out / "latency.png").name
        files["error_plot"] = plot_errors(ok, out / "error_vs_timestep.png").name
    except ImportError:
        report["notes"].append("plots skipped: matplotlib is not installed (pip install 'vdit-deploy[report]')")
    first = [r for r in ok if r["batch"] == min(r["batch"] for r in ok)] if ok else []
    if first:
        from vdit_deploy.video import write_video
        try:
            write_video(out / "samples.gif", np.stack([r["_video"] for r in first]), columns=len(first))
            files["gif"] = "samples.gif"
            report["gif_columns"] = [r["label"] for r in first]
        except VditError as e:
            report["notes"].append(f"GIF skipped: {e}")
    for r in report["results"]:
        r.pop("_video", None)
    report["files"] = files
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(format_markdown(report, {"latency": files["latency_plot"], "error": files["error_plot"],
                                                "samples": files["gif"]}))
    return files


def plot_latency(rows: list[dict], path: Path) -> Path:
    """Median latency per runtime, one bar group per batch; whiskers reach p90."""
    plt = pyplot()
    labels = list(dict.fromkeys(r["label"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=80)
    width = 0.8 / max(len(batches), 1)
    for ax, key, unit, scale in ((axes[0], "step_ms", "ms per step", 1.0), (axes[1], "sample_s", "s per sample", 1.0)):
        for j, b in enumerate(batches):
            med, p90, xs = [], [], []
            for i, label in enumerate(labels):
                r = next((r for r in rows if r["label"] == label and r["batch"] == b), None)
                if r:
                    xs.append(i + (j - (len(batches) - 1) / 2) * width)
                    med.append(r["latency"][key]["median"] * scale)
                    p90.append(r["latency"][key]["p90"] * scale)
            ax.bar(xs, med, width, yerr=[np.zeros(len(med)), np.subtract(p90, med)], capsize=2, label=f"batch {b}")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("latency: median, whisker to p90", fontsize=10)
    return save(fig, path)


def plot_errors(rows: list[dict], path: Path) -> Path:
    """eps relative L2 against timestep, one line per runtime (smallest batch)."""
    b = min((r["batch"] for r in rows), default=1)
    curves = [(r["label"], r["timesteps"], r["accuracy"]["eps_rel_l2_per_step"]) for r in rows
              if r["batch"] == b and r["accuracy"] and not r["accuracy"]["reference"]]
    return plot_error_vs_timestep(curves, path, "eps relative L2 vs reference")
