"""A diffusers model built from a checked directory: its class from a fixed registry, its config, and
the weights weights.py chose, every tensor matched by name and shape (none missing, none unexpected).

Which code runs is decided by the user's command line, never by a file: config.json's `_class_name`
and an export's `vdit.model` class resolve only to diffusers' own model classes (attributes of the
`diffusers` package that are ModelMixins); any other module:Class is imported only when the user
typed it (`--class` on this command line).
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from pathlib import Path

from vdit_deploy.errors import VditError, first_line
from vdit_deploy.weights import TensorInfo, all_tensors, check_layer_counts, load_tensors

QUIET = ("diffusers", "transformers", "torch", "accelerate", "huggingface_hub")


@contextlib.contextmanager
def quiet_libraries():
    """diffusers and transformers log config keys they ignore and weights they skip (hundreds of lines
    before our one-line error): silenced while a model is built and loaded."""
    saved = {name: logging.getLogger(name).level for name in QUIET}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in QUIET:
                logging.getLogger(name).setLevel(logging.CRITICAL)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def model_class(name: str, typed: bool = False):
    """"diffusers:Name" -> that diffusers ModelMixin class (getattr on the package: no module is named
    by the caller). Another "module:Class" only when typed=True (the user's --class): then imported."""
    import importlib

    module, _, cls_name = str(name).partition(":")
    if not module or not cls_name:
        raise VditError(f"--class must be module:Class (e.g. diffusers:LatteTransformer3DModel), got {name!r}")
    if module != "diffusers" and not typed:
        raise VditError(f"the model class {name} is not one of diffusers' own: it is imported only from a --class "
                        "you give on the command line (a model directory or an export never names code to run)")
    if module == "diffusers" and not re.fullmatch(r"[A-Z][A-Za-z0-9]*", cls_name):
        raise VditError(f"{name} is not a diffusers model class name")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except ImportError as e:
        raise VditError(f"cannot import {name}: {first_line(e)}") from None
    except AttributeError:
        raise VditError(f"{module} has no class {cls_name}" + (" (a newer diffusers may; pip install -U diffusers)"
                                                             if module == "diffusers" else "")) from None
    from diffusers import ModelMixin

    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise VditError(f"{name} is not a diffusers model (a ModelMixin subclass)")
    return cls


def estimate_bytes(tensors: dict[str, TensorInfo], config: dict, latent: tuple, batch: int) -> int:
    """Memory to build, load and run the model at `batch` videos, from the headers and the config only:
    the float32 weights twice (built, then loaded), and activations of batch x tokens x the widest layer
    input (tokens: F*H*W over the patch area; a few dozen live tensors of that size). Widest input, not
    widest tensor: a weight is (out, in, ...), and the widest outputs are often adaLN's per-sample 6 x
    width modulation (CogVideoX-2B: 11,520), while the widest per-token activation is what the FFN's
    down projection reads (7,680 there; Wan 1.3B 8,960)."""
    weights = sum(t.numel for t in tensors.values()) * 4
    size = lambda p: p if isinstance(p, int) and not isinstance(p, bool) and p >= 1 else 1
    patch = config.get("patch_size")
    if isinstance(patch, (list, tuple)) and len(patch) == 3:      # Wan's (t, h, w)
        patch_t, patch_h, patch_w = map(size, patch)
    else:
        patch_t, patch_h = size(config.get("patch_size_t")), size(patch)
        patch_w = patch_h
    c, f, h, w = latent
    tokens = max(1, f // patch_t) * max(1, h // patch_h) * max(1, w // patch_w)
    width = max([c, *(t.shape[1] for t in tensors.values() if len(t.shape) >= 2)])
    return 2 * weights + 32 * batch * tokens * width * 4 + batch * math.prod(latent) * 4 * 8


def build(cls, config: dict, path: Path, files: list[Path], headers: dict, cls_name: str):
    """cls.from_config(config) with the directory's weights loaded strictly -> the module in eval mode."""
    import torch

    tensors = all_tensors(headers)
    check_layer_counts(config, tensors, str(path / "config.json"))

    def construct(device=None):
        try:
            with quiet_libraries(), torch.device(device) if device else contextlib.nullcontext():
                return cls.from_config(dict(config))
        except Exception as e:   # a config the class's __init__ cannot take: its own error, first line
            if device:
                return None       # a class that cannot be built on the meta device: checked after building
            raise VditError(f"{path}: {cls_name} cannot be built from its config.json: {first_line(e)}") from None

    # first on the meta device (no memory): a config whose widths the weights do not have is refused
    # before its parameters are allocated (num_attention_heads 10^6 would build a huge model first)
    probe = construct("meta")
    if probe is not None:
        check_state(probe.state_dict(), tensors, path, cls_name)
        del probe
    net = construct()
    expected = net.state_dict()
    check_state(expected, tensors, path, cls_name)
    state = load_tensors(files, headers)
    with torch.no_grad():
        for name, value in state.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise VditError(f"{path}: {name} holds NaN or inf values")
            expected[name].copy_(value.to(expected[name].dtype))
    for p in net.parameters():
        p.requires_grad_(False)
    return net.float().eval()


def check_state(expected: dict, tensors: dict, path: Path, cls_name: str) -> None:
    """The model's state dict against the weights' headers: the same names, the same shapes."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else ""]
        raise VditError(f"{path}: the weights do not match {cls_name} built from its config.json: "
                        f"{', '.join(filter(None, parts))}")
    for name, t in tensors.items():
        if tuple(expected[name].shape) != t.shape:
            raise VditError(f"{path}: {name} has shape {list(t.shape)} in the weights, the config makes "
                            f"{list(expected[name].shape)}")
