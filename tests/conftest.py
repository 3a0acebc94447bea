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
    from vdit_deploy.schedules import Schedule
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


@pytest.fixture(scope="session")
def cache_export(tiny_checkpoint, tmp_path_factory):
    """tiny_checkpoint exported with step caching's split graphs (`--cache-split 1`, batch 1:4)."""
    from vdit_deploy.export.onnx_export import export_checkpoint

    return export_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("cache") / "tiny", batch=(1, 4), cache_split=1)


def open_built(export, precision, **options):
    """`vdit build`'s part (find or build both engines), then the TensorRT runtime, which only loads them."""
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.runtimes.trt_build import KINDS, find_engine

    for kind in KINDS:
        find_engine(export, kind, precision, build=True, progress=False, log=lambda m: None)
    return open_runtime("trt", export, precision=precision, **options)


def save_tiny_latte(path, out_channels: int = 8, variance_type: str = "learned_range",
                    prediction_type: str = "epsilon", seed: int = 0, num_layers: int = 1):
    """A tiny random diffusers LatteTransformer3DModel saved as a user would (`save_pretrained`:
    config.json + diffusion_pytorch_model.safetensors), with a DDPMScheduler's scheduler_config.json
    beside it. Latents 4x2x8x8, caption width 32; out_channels 8 = eps + learned variance."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    latte = diffusers.LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=out_channels, num_layers=num_layers,
        cross_attention_dim=16, caption_channels=32, sample_size=8, patch_size=2, video_length=2,
        norm_type="ada_norm_single", activation_fn="gelu-approximate")
    with torch.no_grad():   # away from the zero-initialised output layers: outputs that depend on the input
        for p in latte.parameters():
            p.add_(0.05 * torch.randn_like(p))
    latte.save_pretrained(path)
    diffusers.DDPMScheduler(variance_type=variance_type, prediction_type=prediction_type).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_latte(tmp_path_factory):
    """A tiny text-conditioned, learned-sigma video DiT directory (diffusers Latte, see save_tiny_latte)."""
    pytest.importorskip("diffusers", reason="pip install 'vdit-deploy[dev]' for the diffusers model tests")
    return save_tiny_latte(tmp_path_factory.mktemp("latte") / "latte")


@pytest.fixture(scope="session")
def tiny_latte_export(tiny_latte, tmp_path_factory):
    """tiny_latte exported once (batch 1:4, 1..16 text tokens): conditioning encoder_hidden_states
    float32 (batch, seq, 32), output eps+var (8 channels), null_cond.safetensors zeros (1, 16, 32)."""
    from vdit_deploy.export.onnx_export import export_checkpoint

    return export_checkpoint(tiny_latte, tmp_path_factory.mktemp("onnx") / "latte", batch=(1, 4), seq=(1, 16))


_FAMILY_EXPORTS = {}


def family_export(name, tmp_path_factory):
    """A tiny model of a family (tests/family_models.py) in the pipeline layout with its pipeline's real
    scheduler config, exported once per session through the Python API (batch 1:3, 1..8 text tokens):
    the family's own conditioning, layout and fixed arguments, the objective and sigmas read from the
    scheduler config. (name, model dir, export dir, the pipeline's call or None, export notes, latent)."""
    pytest.importorskip("diffusers", reason="pip install 'vdit-deploy[dev]' for the diffusers model tests")
    if name not in _FAMILY_EXPORTS:
        import torch

        from family_models import SEQ, save_pipeline, tiny_family
        from vdit_deploy.export.onnx_export import export_source
        from vdit_deploy.sources import load_diffusers_source

        root = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        model, scheduler, latent, call = tiny_family(name)
        path = save_pipeline(root, model, scheduler)
        notes = []
        export = export_source(load_diffusers_source(path, seq=(1, SEQ), latent=latent), root / "export",
                               batch=(1, 3), log=notes.append)
        _FAMILY_EXPORTS[name] = (name, path, export, call, notes, latent)
    return _FAMILY_EXPORTS[name]


@pytest.fixture(scope="session", params=["wan", "ltx", "mochi", "hunyuan"])
def flow_family(request, tmp_path_factory):
    """A flow-matching family's tiny model and export (family_export)."""
    return family_export(request.param, tmp_path_factory)
