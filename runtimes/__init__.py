"""Runtimes: one interface (`Runtime`) over PyTorch, ONNX Runtime and TensorRT.

Importing this package imports no backend library; `open_runtime` imports only the one asked for,
so an edge box without torch can run ONNX Runtime or TensorRT.
"""
from vdit_deploy.runtimes.base import Runtime, TensorSpec, open_runtime, RUNTIMES

__all__ = ["Runtime", "TensorSpec", "open_runtime", "RUNTIMES"]
