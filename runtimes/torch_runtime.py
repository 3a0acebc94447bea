"""PyTorch runtime: the fp32 reference on CPU, and the GPU baseline a user would otherwise pick.

It runs any Source (sources.py): a vdit checkpoint, a diffusers model directory, or a module with a
contract handed in by Python. Precisions fp32 / fp16 / bf16 cast the whole model (no autocast). On any device `step` runs the same
fused guided step as step.onnx (export/step_module.FusedStep: cond + null batch, guidance, update) with
the video kept on the device between steps; `compile` wraps that step in torch.compile
("reduce-overhead": CUDA graphs, "max-autotune": Triton GEMM autotuning plus CUDA graphs, "default").
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn as nn

from vdit_deploy.samplers import SolverState
from vdit_deploy.errors import VditError
from vdit_deploy.export.metadata import STEP_STATE
from vdit_deploy.export.variants import FP32, TORCH_PRECISIONS, check_precision
from vdit_deploy.runtimes.base import COMPILE_MODES, Runtime, TensorSpec
from vdit_deploy.runtimes.torch_tensors import DTYPES, TorchDeviceArray
from vdit_deploy.threads import apply_torch

class _Float32IO(nn.Module):
    """The model in its precision behind float32 inputs/outputs, so the sampler state stays fp32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x_t, t, *cond):
        cond = (c.to(self.dtype) if c.is_floating_point() else c for c in cond)
        return self.model(x_t.to(self.dtype), t, *cond).float()


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, checkpoint, precision: str = FP32, device: str | None = None,
                 compile: str | None = None, source=None):
        """checkpoint: a model directory (sources.load_source); or pass a loaded `source` (a Source)."""
        from vdit_deploy.export.step_module import FusedStep, Unguided
        from vdit_deploy.sources import load_source

        apply_torch()                      # the CLI's --threads (or its default), when one was configured
        check_precision(self.name, precision)
        if compile is not None and compile not in COMPILE_MODES:
            raise VditError(f"torch.compile mode must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
            raise VditError(f"torch runtime device must be cpu, cuda or cuda:N, got {device!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise VditError("torch runtime: device cuda asked for, but torch sees no CUDA GPU")
        self.precision, self.device, self.compile = precision, device, compile
        self.source = source or load_source(checkpoint, device)
        self.model = self.source.module.to(device, DTYPES[precision]).eval()
        self.contract, self.null = self.source.contract, self.source.null
        denoiser = _Float32IO(self.model, DTYPES[precision])
        n = len(self.contract.cond)
        guided, unguided = FusedStep(denoiser, n).eval(), Unguided(denoiser, n).eval()
        if compile:
            guided, unguided = (torch.compile(m, mode=compile, dynamic=False) for m in (guided, unguided))
        self.guided, self.unguided = guided, unguided

    @property
    def files(self):
        return list(self.source.files)

    @property
    def inputs(self):
        return [TensorSpec("x_t", ("batch", *self.contract.latent), "float32"), TensorSpec("t", ("batch",), "float32"),
                *(TensorSpec(c.name, c.shape, c.dtype) for c in self.contract.cond)]

    @property
    def outputs(self):
        c = self.contract
        return [TensorSpec("out", ("batch", c.out_channels, *c.latent[1:]), "float32")]

    def _tensor(self, array, dtype=torch.float32) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, dtype, non_blocking=True)

    @torch.inference_mode()
    def denoise(self, x_t: np.ndarray, t: np.ndarray, cond: dict) -> np.ndarray:
        cond = self.check_inputs(x_t, t, cond)
        out = self.model(self._tensor(x_t, DTYPES[self.precision]), self._tensor(np.asarray(t, np.float32)),
                         *self._cond(cond))
        return out.float().cpu().numpy()

    def _cond(self, cond: dict) -> list:
        """numpy conditioning -> device tensors in contract order, floats in the model's precision."""
        return [self._tensor(a, DTYPES[self.precision]) if np.issubdtype(a.dtype, np.floating)
                else torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in cond.values()]

    def device_inputs(self, x_t, cond, state: SolverState | None):
        """x_t (numpy, or left on the device by the last step), the checked conditioning and the solver
        state as device tensors (zeros before a solver's first step)."""
        b = x_t.shape[0]
        if isinstance(x_t, TorchDeviceArray):
            x = x_t.tensor
            cond = self.contract.check_cond(cond, b)
        else:
            x_host = np.asarray(x_t, np.float32)
            cond = self.check_inputs(x_host, np.zeros(b, np.float32), cond)
            x = self._tensor(x_host)
        solver = [getattr(state, name, None) for name, _ in STEP_STATE]
        solver = [v.tensor if isinstance(v, TorchDeviceArray) else torch.zeros_like(x) if v is None else self._tensor(v)
                  for v in solver]
        return x, cond, solver

    @torch.inference_mode()
    def step(self, x_t, t: int, cond, guidance: float, coefs, noise, state: SolverState | None = None):
        """One guided step on the device; returns a TorchDeviceArray (np.asarray copies it out). A
        multistep solver's state (previous x0, UniPC's corrector part) stays on the device too."""
        b = x_t.shape[0]
        x, cond, solver = self.device_inputs(x_t, cond, state)
        if self.compile:   # a new step of a CUDA-graph tree: earlier outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        t_, cond_ = self._tensor(np.full(b, t, np.float32)), self._cond(cond)
        coefs_, noise_ = self._tensor(np.asarray(coefs, np.float32)), self._tensor(noise)
        if guidance == 1.0:   # no null pass: half the work of the 2B guided batch
            outs = self.unguided(x, t_, *cond_, coefs_, noise_, *solver)
        else:
            null_ = self.null_rows(cond, self._cond)     # on the device once per batch and shape
            outs = self.guided(x, t_, *cond_, *null_, self._tensor(np.float32([guidance])), coefs_, noise_, *solver)
        # CUDA-graph outputs live in the graph's memory pool and are overwritten by the next replay
        x_prev, *next_state = (o.clone() if self.compile else o for o in outs)
        if state is not None:   # this step's outputs are the next step's state inputs
            for (name, _), value in zip(STEP_STATE, next_state):
                setattr(state, name, TorchDeviceArray(value))
        return TorchDeviceArray(x_prev)

    def cached_step(self, x_t, t: int, cond, guidance: float, coefs, noise, state=None, cache=None,
                    blocks: int = 1):
        """A step of step caching (runtimes/torch_cache.py): the model cut after `blocks` blocks as
        `vdit export --cache-split` cuts it; the tail runs unless `cache` skips it."""
        if getattr(self, "_cache", None) is None or self._cache.blocks != blocks:
            from vdit_deploy.runtimes.torch_cache import TorchCache
            self._cache = TorchCache(self, blocks)
        return self._cache.step(x_t, t, cond, guidance, coefs, noise, state, cache)

    def describe(self) -> str:
        compiled = f", torch.compile {self.compile}" if self.compile else ""
        return f"torch:{self.precision} on {self.device}{compiled}"
