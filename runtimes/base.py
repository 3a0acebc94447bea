"""The runtime interface every backend implements (numpy in, numpy out; no torch import here).

A runtime holds one loaded artifact (a model directory, an ONNX file, an engine) and offers
  contract, null                    the model contract (contract.py) and its null conditioning (batch 1)
  files, batch_range                what it loaded and the videos per denoise() call it takes
  denoise(x_t, t, cond) -> out      x_t float32 (B, C, F, H, W), t float32 (B,), cond: name -> array
                                    (the contract's conditioning, batch first); out (B, kC, F, H, W)
  step(x_t, t, cond, guidance, coefs, noise, state=None) -> x_{t-1}   one guided sampler step
      (samplers.py; the null conditioning is the runtime's own); a multistep solver's SolverState
      (previous x0, UniPC's corrector part) is read and replaced
  cached_step(..., state, cache)    the same step with step caching (step_cache.py): the split graphs'
                                    head, then the tail unless the cache policy skips it
The default `step` runs `denoise` and the update on the host; backends with a fused step graph
override it and may keep x_t and the state on the device between calls (then `step` returns a
device handle that np.asarray turns into numpy).
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vdit_deploy.contract import Contract
from vdit_deploy.schedules import Schedule
from vdit_deploy.samplers import SolverState, guided_step
from vdit_deploy.errors import VditError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple          # ints, or strings for dynamic axes ("batch")
    dtype: str            # numpy dtype name

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(str(s) for s in self.shape)}]"


class Runtime(ABC):
    name: str = "?"
    precision: str = "fp32"
    device: str = "cpu"
    contract: Contract
    null: dict                    # name -> batch-1 array

    @property
    def schedule(self) -> Schedule:
        return self.contract.schedule

    @property
    @abstractmethod
    def inputs(self) -> list[TensorSpec]: ...

    @property
    @abstractmethod
    def outputs(self) -> list[TensorSpec]: ...

    @property
    @abstractmethod
    def files(self) -> list[Path]:
        """The files it loaded (weights, graphs, engines, with their external data), the main one first."""

    @property
    def batch_range(self) -> tuple[int, int]:
        """(min, max) rows per denoise() call; a guided step runs twice its videos through the graph."""
        return 1, 2 ** 31 - 1

    @abstractmethod
    def denoise(self, x_t: np.ndarray, t: np.ndarray, cond: dict) -> np.ndarray: ...

    def step(self, x_t, t: int, cond: dict, guidance: float, coefs: np.ndarray, noise: np.ndarray,
             state: SolverState | None = None):
        null = self.null_rows(cond) if guidance != 1.0 else None
        return guided_step(self.denoise_rows, x_t, t, cond, null, guidance, coefs, noise, state)

    def denoise_rows(self, x_t, t, cond: dict) -> np.ndarray:
        """denoise() on any number of rows, in calls of at most batch_range's max: a guided step's 2B rows
        on a fixed-batch export (LTX-Video, Mochi) run as B-row calls. Inputs without the batch axis
        (a per-call scalar) go whole to each call."""
        return in_rows(self.denoise, self.batch_range[1], x_t, t, cond)

    def null_rows(self, cond: dict, convert=None) -> dict:
        """The null conditioning repeated to cond's batch (contract.null_batch), passed through
        `convert` (e.g. onto the device), made once per batch and shape: every step of a sample
        reuses it instead of repeating (and uploading) the empty prompt's embeddings again."""
        key = tuple((name, np.shape(value)) for name, value in sorted(cond.items()))
        # a per-call scalar's null rows are the prompt's own values (contract.null_batch): part of the key
        key += tuple(np.asarray(cond[c.name]).tobytes() for c in self.contract.cond if c.role == "scalar")
        cached = getattr(self, "_null_rows", None)
        if cached is None or cached[0] != (key, convert):
            rows = self.contract.null_batch(self.null, cond)
            self._null_rows = cached = (key, convert), (convert(rows) if convert else rows)
        return cached[1]

    def cached_step(self, x_t, t: int, cond: dict, guidance: float, coefs: np.ndarray, noise: np.ndarray,
                    state: SolverState | None = None, cache=None):
        """`step` with step caching: runs the split graphs' head, asks `cache` (a step_cache.StepCache)
        whether to skip the tail, and keeps the cache's references up to date."""
        raise VditError(f"the {self.name} runtime has no step caching (--cache is for ort, torch and trt)")

    def check_inputs(self, x_t: np.ndarray, t: np.ndarray, cond: dict) -> dict:
        """-> cond in the contract's dtypes; one-line errors for shapes and names."""
        expected = tuple(self.contract.latent)
        if x_t.ndim != 5 or tuple(x_t.shape[1:]) != expected:
            raise VditError(f"x_t has shape {tuple(x_t.shape)}, expected (batch, {', '.join(map(str, expected))})")
        if t.shape != (x_t.shape[0],):
            raise VditError(f"t must have shape ({x_t.shape[0]},), got {t.shape}")
        return self.contract.check_cond(cond, x_t.shape[0])

    def describe(self) -> str:
        return f"{self.name}:{self.precision} on {self.device}"

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# torch.compile modes of the torch runtime's step ("reduce-overhead": CUDA graphs); torch-free, for the CLI.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")

# name -> (module, class, what to install). Modules are imported only when asked for.
RUNTIMES = {
    "torch": ("vdit_deploy.runtimes.torch_runtime", "TorchRuntime", "pip install 'vdit-deploy[torch]'"),
    "ort": ("vdit_deploy.runtimes.ort_runtime", "OrtRuntime", "pip install vdit-deploy"),
    "trt": ("vdit_deploy.runtimes.trt_runtime", "TrtRuntime", "pip install 'vdit-deploy[trt]'"),
    "ort-trt": ("vdit_deploy.runtimes.ort_runtime", "OrtTrtRuntime",
                "pip uninstall onnxruntime && pip install 'vdit-deploy[gpu,trt]'"),
}


def check_runtime_name(name: str) -> str:
    if name not in RUNTIMES:
        raise VditError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}")
    return name


def open_runtime(name: str, artifact, **options) -> Runtime:
    """Open `artifact` (checkpoint dir, export dir or ONNX file, engine) with the runtime `name`."""
    module, cls, install = RUNTIMES[check_runtime_name(name)]
    try:
        backend = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise VditError(f"runtime {name!r} needs {e.name or e}: {install}") from None
    return backend(artifact, **options)


def in_rows(denoise, hi: int, x_t, t, cond: dict) -> np.ndarray:
    """denoise(x_t, t, cond) on any number of rows, in calls of at most `hi` rows; inputs without the
    batch axis (a per-call scalar) go whole to each call. Runtime.denoise_rows, and the Triton sampler's
    calls to a fixed-batch denoiser (export/triton_python.py)."""
    n = len(x_t)
    if n <= hi:
        return denoise(x_t, t, cond)

    def rows(v, i):
        return v[i:i + hi] if np.ndim(v) and len(v) == n else v

    return np.concatenate([denoise(x_t[i:i + hi], t[i:i + hi], {k: rows(v, i) for k, v in cond.items()})
                           for i in range(0, n, hi)])

