"""Measuring one runtime: latency, memory and accuracy against a reference that saw the same inputs.

Accuracy has two parts, shared with `vdit calibrate report`:
  - teacher forcing: the reference records each denoiser call's inputs (x_t, t and the conditioning,
    null rows included) along its trajectory (`record_calls`) and every other denoiser runs on exactly
    those inputs (`teacher_forced`): the error of its own output (eps, v or x0, and an eps+var model's
    variance channels; "eps" in the report's keys) at each step, without the drift of its own trajectory;
  - the final videos of full independent samples (same seed, same noise): PSNR, SSIM, max error
    (`accuracy`), where the drift shows.
"""
from __future__ import annotations

import time

import numpy as np

from vdit_deploy.compare.artifacts import Target
from vdit_deploy.compare.machine import PeakRss, device_memory_mb
from vdit_deploy.metrics import max_abs, psnr, rel_l2, ssim
from vdit_deploy.sampling import DenoiseRecorder, SampleTimes, sample


def stats(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "min": float(v.min()),
            "max": float(v.max()), "mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def videos_cond(pool: dict, seed: int, batch: int) -> dict:
    """The conditioning of a sample's `batch` videos: row (seed + i) % rows of the pool for video i
    (the pool: every class label of a class model, or the rows of a --cond file)."""
    rows = len(next(iter(pool.values())))
    index = (seed + np.arange(batch)) % rows
    return {name: a[index] for name, a in pool.items()}


def record_calls(denoise, contract, cond, plan, guidance: float, seed: int, null: dict | None
                 ) -> tuple[np.ndarray, list, list]:
    """Sample with `denoise` (host step; null: the batch-1 null conditioning for guidance) ->
    (videos, [(x_t, t, cond, out)] per call, seconds per call)."""
    rec = DenoiseRecorder(denoise)
    video = sample(rec, contract, cond, plan, guidance, seed, null=null)
    return video, [call[1:] for call in rec.calls], rec.seconds


def teacher_forced(denoise, calls: list) -> tuple[list[float], list[float]]:
    """`denoise` on the reference's recorded calls -> (output relative L2 per call, seconds per call)."""
    errors, seconds = [], []
    for x_t, t, cond, out_ref in calls:
        start = time.perf_counter()
        out = denoise(x_t, t, cond)
        seconds.append(time.perf_counter() - start)
        errors.append(rel_l2(out, out_ref))
    return errors, seconds


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None   # JSON has no inf: null PSNR means bit-identical


def accuracy(videos: dict, refs: dict, eps_err: list[list[float]], seeds: list[int]) -> dict:
    """Final videos {seed: (B, C, F, H, W)} against the reference's, and the teacher-forced eps errors
    (seeds, calls): the worst seed for the video metrics, mean and max over seeds for eps."""
    per_seed = []
    for seed in seeds:
        got, ref = videos[seed], refs[seed]
        h, w = got.shape[-2:]
        per_seed.append({"seed": seed, "finite": bool(np.isfinite(got).all()),
                         "psnr_db": _finite(psnr(got, ref)), "ssim": ssim(got, ref) if min(h, w) >= 7 else None,
                         "max_abs": max_abs(got, ref), "video_rel_l2": rel_l2(got, ref)})
    err = np.asarray(eps_err, np.float64)           # (seeds, steps)
    psnrs = [s["psnr_db"] for s in per_seed if s["psnr_db"] is not None]
    ssims = [s["ssim"] for s in per_seed if s["ssim"] is not None]
    return {"finite": all(s["finite"] for s in per_seed),
            "psnr_db": min(psnrs) if psnrs else None, "ssim": min(ssims) if ssims else None,
            "max_abs": max(s["max_abs"] for s in per_seed),
            "video_rel_l2": max(s["video_rel_l2"] for s in per_seed),
            "eps_rel_l2_mean": float(err.mean()), "eps_rel_l2_max": float(err.max()),
            "eps_rel_l2_per_step": err.mean(axis=0).tolist(), "per_seed": per_seed}


def measure(target: Target, open_rt, batch: int, seeds: list[int], sampler: str, steps: int,
            eta: float, guidance: float, repeats: int, reference: dict, pool: dict | None,
            record: bool = False) -> dict:
    """One (runtime, batch) row. open_rt(): the runtime (its load is timed). `reference`: {seed: (video,
    recorded calls)} from the reference run ({} when there is none). pool: the conditioning rows the
    videos take in turn (videos_cond); None: every class of a class model. record=True: this run is
    the reference; it records its denoiser calls and returns them under "_recorded"."""
    from vdit_deploy.sampling import conditioning, sampler_plan

    row = {"runtime": target.runtime, "precision": target.precision, "label": target.label, "batch": batch}
    mem = PeakRss().start()
    device_before = device_memory_mb()
    start = time.perf_counter()
    rt = open_rt()
    try:
        load_s = time.perf_counter() - start
        contract = rt.contract
        pool = conditioning(contract, cond=pool)
        cond = {seed: videos_cond(pool, seed, batch) for seed in seeds}
        plan = sampler_plan(contract, sampler, None if sampler == "ddpm" else steps, eta)
        # first call: one step at this batch (engine/graph set-up happens here, not in the timings)
        x = np.random.default_rng(0).standard_normal((batch, *contract.latent), dtype=np.float32)
        start = time.perf_counter()
        np.asarray(rt.step(x, plan[0].t, cond[seeds[0]], guidance, plan[0].coefs, np.zeros_like(x)))
        first_s = time.perf_counter() - start
        sample(rt, contract, cond[seeds[0]], plan, guidance, seeds[0])  # warm-up
        totals, step_s, videos = [], [], {}
        for i in range(max(repeats, len(seeds))):   # every seed at least once; its video is kept
            seed = seeds[i % len(seeds)]
            times = SampleTimes()
            video = sample(rt, contract, cond[seed], plan, guidance, seed, times=times)
            totals.append(times.total)
            step_s += times.steps
            videos.setdefault(seed, video)
        # memory of load + runs, before the reference's recordings (kept for the others) are made
        memory = mem.stop()
        device_mb = device_memory_mb()
        recorded, denoise_s, eps_err = {}, [], []
        for seed in seeds:
            if record:               # the reference: record each denoiser call's inputs and output
                _, recorded[seed], seconds = record_calls(rt.denoise, contract, cond[seed], plan, guidance, seed,
                                                          rt.null)
                denoise_s += seconds
            elif seed in reference:  # teacher forcing: this runtime's eps on the reference's inputs
                errors, seconds = teacher_forced(rt.denoise_rows, reference[seed][1])
                eps_err.append(errors)
                denoise_s += seconds
        files = rt.files   # what it actually loaded (weights, graphs, engines), with external data
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
    elif all(s in reference for s in seeds):
        row["accuracy"] = {"reference": False, **accuracy(videos, {s: reference[s][0] for s in seeds}, eps_err, seeds)}
    else:
        row["accuracy"] = None
    row["_video"] = videos[seeds[0]][0]
    return row
