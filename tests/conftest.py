"""Shared fixtures. GPU tests are marked @pytest.mark.gpu and skip with a reason where no GPU exists."""
import shutil

import pytest


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def pytest_collection_modifyitems(config, items):
    if has_nvidia_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none here): run benchmarks/gpu_check.sh on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A small random checkpoint with non-zero outputs (adaLN-Zero weights perturbed)."""
    import torch

    from vdit_deploy.checkpoint import save_checkpoint
    from vdit_deploy.config import preset
    from vdit_deploy.diffusion import Schedule
    from vdit_deploy.model import VideoDiT

    torch.manual_seed(0)
    cfg = preset("tiny")
    model = VideoDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, model.state_dict(), cfg, Schedule(), step=0, ema=False)
    return path


def trt_skip_reason() -> str | None:
    """Why TensorRT tests cannot run here (None when they can): no GPU; TensorRT missing, too old, or
    its bindings installed without their libraries (libnvinfer); no cuda-python."""
    from vdit_deploy.errors import VditError
    from vdit_deploy.runtimes.engine_cache import import_cudart, import_tensorrt

    if not has_nvidia_gpu():
        return "needs an NVIDIA GPU (none here): run benchmarks/gpu_check.sh on a GPU machine"
    try:   # importing, not just finding the module: the bindings can be there without libnvinfer
        import_tensorrt()
        import_cudart()
    except VditError as e:
        return str(e)
    return None


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory):
    """tiny_checkpoint exported once (denoiser.onnx + step.onnx, batch 1:4) for the ONNX tests."""
    from vdit_deploy.export.onnx_export import export_checkpoint

    return export_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny", batch=(1, 4))


def open_built(export, precision, **options):
    """`vdit build`'s part (find or build both engines), then the TensorRT runtime, which only loads them."""
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.runtimes.trt_build import KINDS, find_engine

    for kind in KINDS:
        find_engine(export, kind, precision, build=True, progress=False, log=lambda m: None)
    return open_runtime("trt", export, precision=precision, **options)
