"""The machine a comparison ran on: what it is (CPU, GPUs, library versions) and what memory each
runtime took (host RSS, device memory).

A latency is only meaningful next to the machine that measured it, so the report records both, and
the memory meters reset between rows so that each row pays only for its own runtime."""
from __future__ import annotations

import ctypes
import gc
import importlib.metadata
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np


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
