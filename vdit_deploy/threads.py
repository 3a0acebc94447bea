"""How many CPU threads torch and ONNX Runtime use: one count for both, chosen once (torch-free).

Both libraries default to one thread per core and spin while they wait. On a machine other jobs
share, that oversubscribes it: each thread waits for a core another process holds (a 2-core VM at
load 10-12 ran `vdit sample` 30x slower with 2 torch threads than with 1: RESULTS.md). The default here
is the cores this process may run on minus the 1-minute load average others put on them, rounded,
at least 1 (benchmarks/bench_threads.py measures it against 1 and 2 threads under a background load).

    configure(n)          the CLI's --threads (None: default_threads()); torch now if it is loaded
    count()               the configured count, else default_threads(): what ORT sessions take
    session_options()     onnxruntime.SessionOptions with intra/inter-op threads set to count()
    apply_torch()         torch.set_num_threads / set_num_interop_threads from the configured count
"""
from __future__ import annotations

import math
import os
import sys

_configured: int | None = None


def cores() -> int:
    """CPUs this process may run on (its affinity mask: a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):      # macOS, Windows
        return os.cpu_count() or 1


def load() -> float:
    """The 1-minute load average (runnable processes, this one included); 0 where there is none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def default_threads(n_cores: int | None = None, load_avg: float | None = None) -> int:
    """Cores minus the load already on them, rounded to the nearest, at least 1."""
    n_cores = cores() if n_cores is None else n_cores
    load_avg = load() if load_avg is None else load_avg
    return max(1, min(n_cores, math.floor(n_cores - load_avg + 0.5)))


def oversubscribed(threads: int, n_cores: int | None = None, load_avg: float | None = None) -> str | None:
    """A one-line warning when `threads` plus the load already there exceed the cores, else None."""
    n_cores = cores() if n_cores is None else n_cores
    load_avg = load() if load_avg is None else load_avg
    if threads + load_avg <= n_cores + 0.5:
        return None
    return (f"warning: {threads} thread(s) on {n_cores} core(s) at load {load_avg:.1f}: the machine is "
            f"oversubscribed, expect slow runs" + ("" if threads == 1 else
                                                  f" (--threads {default_threads(n_cores, load_avg)} fits best)"))


def configure(threads: int | None = None) -> tuple[int, str | None]:
    """Set the thread count for this process (None: the default) -> (count, warning or None).
    torch takes it now if it is imported, else when TorchRuntime / export / training start."""
    global _configured
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    n_cores, load_avg = cores(), load()
    _configured = threads or default_threads(n_cores, load_avg)
    warning = oversubscribed(_configured, n_cores, load_avg)
    if sys.modules.get("torch") is not None:      # imported (None: blocked, as a torch-free box has it)
        apply_torch()
    return _configured, warning


def configured() -> int | None:
    return _configured


def count() -> int:
    return _configured or default_threads()


def session_options(options=None):
    """ONNX Runtime session options (new, or `options`) using count() threads within and across ops."""
    import onnxruntime as ort

    options = options or ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = count()
    return options


def apply_torch() -> None:
    """Give torch the configured count (nothing when none is: a library caller keeps torch's own)."""
    if _configured is None:
        return
    import torch

    if torch.get_num_threads() != _configured:
        torch.set_num_threads(_configured)
    try:   # settable once per process, before any inter-op work; later calls keep the first value
        if torch.get_num_interop_threads() != _configured:
            torch.set_num_interop_threads(_configured)
    except RuntimeError:
        pass
