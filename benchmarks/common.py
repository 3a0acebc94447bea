"""What the benchmark scripts share: a checkpoint with random weights, and a median timer.
(Run as `python benchmarks/bench_*.py`: this folder is then first on sys.path.)"""
from __future__ import annotations

import statistics
import time
from pathlib import Path


def random_checkpoint(cfg, path: Path, seed: int = 0) -> Path:
    """A checkpoint of `cfg` with random weights and the adaLN-Zero gates opened (a fresh DiT outputs
    zeros), written once and reused: the speed of a size, not the quality of a model."""
    import torch

    from vdit_deploy.checkpoint import save_checkpoint
    from vdit_deploy.schedules import Schedule
    from vdit_deploy.model import VideoDiT

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    model = VideoDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_checkpoint(path, model.state_dict(), cfg, Schedule(), step=0, ema=False)
    return path


def median_seconds(fn, repeats: int, warmup: int = 1, sync=None) -> float:
    """Median wall time of fn() over `repeats` runs after `warmup` untimed ones; `sync` (e.g.
    torch.cuda.synchronize) runs inside each timing so asynchronous GPU work is counted."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_calls(rows: dict, name: str, rt, x, t, cond, repeats: int, ref):
    """One runtime's per-call seconds and its error against `ref` (the first runtime's output) into
    rows[name]; returns the reference."""
    from vdit_deploy.metrics import rel_l2

    got = rt.denoise(x, t, cond)
    seconds = median_seconds(lambda: rt.denoise(x, t, cond), repeats, warmup=0)
    ref = got if ref is None else ref
    rows[name] = {"seconds_per_call": round(seconds, 2), "rel_l2_vs_torch": float(rel_l2(got, ref))}
    print(f"{name:<18} {seconds:8.2f} s/call  rel L2 vs torch {rows[name]['rel_l2_vs_torch']:.2e}", flush=True)
    return ref


def with_speedups(rows: dict) -> dict:
    base = rows["torch fp32"]["seconds_per_call"]
    for row in rows.values():
        row["speedup_vs_torch"] = round(base / row["seconds_per_call"], 2)
    return rows


def write_report(path: Path | None, report: dict, done: bool = False) -> None:
    """The JSON report so far (written after each row, so a stopped run keeps its rows); done: the run
    ended, its end load average is added. path None: nothing is written."""
    import json

    if done:
        report["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    if path is not None:
        path.write_text(json.dumps(report, indent=1) + "\n")
