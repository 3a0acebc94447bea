"""PyTorch eager runtime: the fp32 reference, plus fp16/bf16 autocast-free casts of the model."""
from __future__ import annotations

import numpy as np
import torch

from vdit_deploy.checkpoint import load_model
from vdit_deploy.errors import VditError
from vdit_deploy.runtimes.base import Runtime, TensorSpec

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, checkpoint, precision: str = "fp32", device: str | None = None):
        if precision not in DTYPES:
            raise VditError(f"torch runtime precision must be one of {', '.join(DTYPES)}, got {precision!r}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise VditError("torch runtime: device cuda asked for, but torch sees no CUDA GPU")
        self.precision, self.device = precision, device
        self.model, self.info = load_model(checkpoint, device)
        self.model.to(DTYPES[precision])
        self.config, self.schedule = self.info.model, self.info.schedule

    @property
    def inputs(self):
        return [TensorSpec("x_t", ("batch", *self.config.video_shape), "float32"),
                TensorSpec("t", ("batch",), "float32"), TensorSpec("y", ("batch",), "int32")]

    @property
    def outputs(self):
        return [TensorSpec("eps", ("batch", *self.config.video_shape), "float32")]

    @torch.inference_mode()
    def denoise(self, x_t: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        self.check_inputs(x_t, t, y)
        dtype = DTYPES[self.precision]
        eps = self.model(torch.from_numpy(np.ascontiguousarray(x_t)).to(self.device, dtype),
                         torch.from_numpy(np.ascontiguousarray(t, np.float32)).to(self.device),
                         torch.from_numpy(np.ascontiguousarray(y)).to(self.device, torch.long))
        return eps.float().cpu().numpy()
