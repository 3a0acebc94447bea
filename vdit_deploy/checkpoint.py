"""Checkpoints: a directory with `model.safetensors` and `config.json` (the Hugging Face layout).

config.json holds the model config, the noise schedule, the training step and whether the weights
are the EMA copy. Loading never unpickles. The config half is torch-free (runtimes read it); the
weights half imports torch lazily.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vdit_deploy import validate as v
from vdit_deploy.config import ModelConfig, check_memory
from vdit_deploy.schedules import Schedule
from vdit_deploy.errors import VditError
from vdit_deploy.files import atomic_path, read_json, sha256_file

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT = "vdit-checkpoint/1"
SHIPPED = Path(__file__).parent / "assets" / "tiny"   # the trained demo checkpoint
SHIPPED_FLOW = Path(__file__).parent / "assets" / "tiny-flow"   # the same model fine-tuned to flow matching


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    model: ModelConfig
    schedule: Schedule
    step: int
    ema: bool

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    def sha256(self) -> str:
        return sha256_file(self.weights)


def read_info(path: str | Path) -> CheckpointInfo:
    path = Path(path)
    if not path.is_dir():
        raise VditError(f"checkpoint {path} is not a directory with {WEIGHTS} and {CONFIG}")
    if not (path / CONFIG).exists():
        raise VditError(f"checkpoint {path} has no {CONFIG}")
    where = str(path / CONFIG)
    meta = read_json(path / CONFIG, "checkpoint config", root=path)   # a regular file of bounded size
    if not (path / WEIGHTS).exists():
        raise VditError(f"checkpoint {path} has no {WEIGHTS}")
    return parse_config(meta, path, where)


def parse_config(meta, path: Path, where: str) -> CheckpointInfo:
    """config.json's content -> CheckpointInfo, every field checked (vdit_deploy/validate.py)."""
    v.obj(meta, "checkpoint config", where=where, extra_ok=True)
    if meta.get("format") != FORMAT:
        v.fail(where, f"not a vdit checkpoint config (format {v.show(meta.get('format'))}, expected {FORMAT!r})")
    v.obj(meta, "checkpoint config", required=("format", "model", "schedule", "step", "ema"), where=where)
    return CheckpointInfo(path, ModelConfig.from_dict(meta["model"], where), Schedule.from_dict(meta["schedule"], where),
                          v.integer(meta["step"], "step", 0, where=where), v.boolean(meta["ema"], "ema", where))


def write_config(path: Path, model: ModelConfig, schedule: Schedule, step: int, ema: bool) -> None:
    meta = {"format": FORMAT, "model": model.to_dict(), "schedule": schedule.to_dict(), "step": step, "ema": ema}
    (path / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def save_checkpoint(path: str | Path, state_dict: dict, model: ModelConfig, schedule: Schedule,
                    step: int, ema: bool, extra_files: dict | None = None) -> None:
    """Write atomically: the directory appears complete or not at all.
    extra_files: {name: {tensor name: tensor}} further safetensors files (e.g. training state)."""
    from safetensors.torch import save_file

    with atomic_path(path, is_dir=True, marker=CONFIG) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp / WEIGHTS))
        for name, tensors in (extra_files or {}).items():
            save_file(tensors, str(tmp / name))
        write_config(tmp, model, schedule, step, ema)


def load_tensors(file: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from vdit_deploy.weights import read_header

    read_header(file, file.parent)     # a regular file inside the checkpoint, its header true to its size
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise VditError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def load_model(path: str | Path = SHIPPED, device: str = "cpu"):
    """-> (VideoDiT in eval mode, CheckpointInfo). Mismatched weights give a one-line VditError."""
    from vdit_deploy.model import VideoDiT

    info = read_info(path)
    check_memory(info.model.memory_bytes(batch=2), f"the model of {path}")   # before VideoDiT allocates
    model = VideoDiT(info.model)
    state = load_tensors(info.weights)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise VditError(f"{info.weights} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise VditError(f"{info.weights}: {name} has shape {tuple(tensor.shape)}, "
                            f"config expects {tuple(expected[name].shape)}")
        if not tensor.is_floating_point() or not bool(tensor.isfinite().all()):
            raise VditError(f"{info.weights}: {name} holds NaN or inf values (or is not floating point)")
    model.load_state_dict(state)
    return model.to(device).eval(), info
