"""What the torch runtime and its step cache share: the dtype of each torch precision, and a tensor
kept on the device between steps."""
from __future__ import annotations

import torch

from vdit_deploy.export.variants import TORCH_PRECISIONS

DTYPES = dict(zip(TORCH_PRECISIONS, (torch.float32, torch.float16, torch.bfloat16)))


class TorchDeviceArray:
    """A video that stays on the torch device between steps; np.asarray copies it to the host."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    @property
    def shape(self) -> tuple:
        return tuple(self.tensor.shape)

    @property
    def ndim(self) -> int:
        return self.tensor.ndim

    def __array__(self, dtype=None, copy=None):
        out = self.tensor.float().cpu().numpy()
        return out if dtype is None else out.astype(dtype, copy=False)
