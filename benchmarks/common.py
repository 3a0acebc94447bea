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
