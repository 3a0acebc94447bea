"""Training on Moving Shapes: eps-prediction MSE (Ho et al.) or flow matching's velocity MSE (a
FlowSchedule), AdamW, EMA weights, label dropout.

The output directory is itself a checkpoint (EMA weights in model.safetensors) plus
training_state.safetensors (raw weights, optimizer moments), so `--out DIR` can be sampled from
while training runs and a stopped run resumes where it left off.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vdit_deploy.checkpoint import load_tensors, read_info, save_checkpoint
from vdit_deploy import validate as v
from vdit_deploy.config import ModelConfig, check_memory
from vdit_deploy.data import MovingShapes
from vdit_deploy.flow import FlowSchedule
from vdit_deploy.schedules import Schedule
from vdit_deploy.errors import VditError
from vdit_deploy.files import check_output
from vdit_deploy.model import VideoDiT
from vdit_deploy.threads import apply_torch

TRAINING_STATE = "training_state.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 8e-4
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1     # null label this often, so classifier-free guidance works
    min_snr_gamma: float = 5.0     # Min-SNR loss weighting (Hang et al. 2023); 0 turns it off
    checkpoint_every: int = 250
    seed: int = 0

    def __post_init__(self):
        where = "training config"
        for name in ("steps", "batch_size", "warmup", "checkpoint_every"):
            v.integer(getattr(self, name), name, 1, where=where)
        v.integer(self.seed, "seed", 0, 2 ** 32 - 1, where)
        v.number(self.lr, "lr", 0, lo_open=True, where=where)
        v.number(self.weight_decay, "weight_decay", 0, where=where)
        v.number(self.ema_decay, "ema_decay", 0, 1, where=where)
        v.number(self.label_dropout, "label_dropout", 0, 1, where=where)
        v.number(self.min_snr_gamma, "min_snr_gamma", 0, where=where)



def moving_shapes_config(cfg: ModelConfig) -> tuple[ModelConfig, str | None]:
    """The config trained on Moving Shapes (RGB pixels, 4 classes) and, when that differs from `cfg`
    (the latent presets S..XL take 4 channels and 1000 classes), a note saying what changed."""
    if cfg.in_channels == 3 and cfg.num_classes <= 4:
        return cfg, None
    changed = cfg.replace(in_channels=3, num_classes=4)
    return changed, (f"Moving Shapes is RGB with 4 classes: training this preset with in_channels 3 (was "
                     f"{cfg.in_channels}) and num_classes 4 (was {cfg.num_classes})")

def diffusion_loss(model: VideoDiT, x0: torch.Tensor, y: torch.Tensor, alphas_cumprod: torch.Tensor,
                   gen: torch.Generator, min_snr_gamma: float = 0.0) -> torch.Tensor:
    """MSE between the true noise and the predicted one at a uniformly drawn timestep.

    With min_snr_gamma > 0 each sample is weighted by min(SNR, gamma) / SNR: the nearly clean timesteps,
    whose eps error is large but says little, stop drowning out the noisy ones that decide the global
    layout (where the shape is, what it is), which converges several times faster."""
    b = x0.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (b,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    ab = alphas_cumprod[t]
    x_t = ab.sqrt().view(b, 1, 1, 1, 1) * x0 + (1 - ab).sqrt().view(b, 1, 1, 1, 1) * noise   # q(x_t | x_0)
    per_sample = F.mse_loss(model(x_t, t, y), noise, reduction="none").mean(dim=(1, 2, 3, 4))  # (B,)
    if min_snr_gamma > 0:
        snr = ab / (1 - ab)
        per_sample = per_sample * snr.clamp(max=min_snr_gamma) / snr
    return per_sample.mean()


def flow_loss(model: VideoDiT, x0: torch.Tensor, y: torch.Tensor, num_timesteps: int,
              gen: torch.Generator) -> torch.Tensor:
    """Flow matching (rectified flow, Lipman et al. 2023; Esser et al. 2024): x_s = (1 - s) x0 + s noise
    at s drawn logit-normal (SD3's m = 0, s = 1: the middle of the path, where the velocity is hardest,
    drawn most), fed t = s * num_timesteps; MSE between the model output and the velocity noise - x0."""
    b = x0.shape[0]
    s = torch.sigmoid(torch.randn(b, generator=gen))                                  # (B,) in (0, 1)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = (1 - s).view(b, 1, 1, 1, 1) * x0 + s.view(b, 1, 1, 1, 1) * noise
    return F.mse_loss(model(x_t, s * num_timesteps, y), noise - x0)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict:
    out = {}
    for idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"opt.{idx}.{key}"] = torch.as_tensor(value).float().reshape(-1) if key == "step" else value
    return out


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict) -> None:
    state = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value.reshape(()) if key == "step" else value
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


def train(model_cfg: ModelConfig, out: str | Path, cfg: TrainConfig = TrainConfig(),
          schedule: Schedule | FlowSchedule = Schedule("cosine"), progress: bool = True,
          init: str | Path | None = None) -> dict:
    """Train (or resume) into `out`. init: a checkpoint of the same model config whose weights a new
    run starts from (e.g. a DDPM checkpoint fine-tuned to flow matching: it knows the data already)."""
    if model_cfg.in_channels != 3:
        raise VditError("Moving Shapes videos are RGB: the model needs in_channels=3")
    out = check_output(out, is_dir=True, marker=TRAINING_STATE)   # fail before training, not at a checkpoint
    check_memory(model_cfg.memory_bytes(cfg.batch_size, training=True), f"training at batch {cfg.batch_size}")
    apply_torch()                       # --threads (a no-op unless the CLI configured a count)
    torch.manual_seed(cfg.seed)
    model = VideoDiT(model_cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if init is not None and not (out / TRAINING_STATE).is_file():
        start_info = read_info(init)
        if start_info.model != model_cfg:
            raise VditError(f"{init} holds another model config than the one trained; it cannot start this run")
        model.load_state_dict(load_tensors(start_info.weights))
        ema.load_state_dict(model.state_dict())
    if (out / TRAINING_STATE).is_file():   # resume
        info = read_info(out)
        if info.model != model_cfg or info.schedule != schedule:
            raise VditError(f"{out} holds a run with another model config or schedule; choose a new --out")
        state = load_tensors(out / TRAINING_STATE)
        model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        ema.load_state_dict(load_tensors(info.weights))
        _load_optimizer(opt, state)
        start = info.step
        if start >= cfg.steps:
            raise VditError(f"{out} is already trained to step {start}; pass --steps above {start} to go on")
    data = MovingShapes(model_cfg.frames, model_cfg.height, model_cfg.width, model_cfg.num_classes, cfg.seed)
    flow = schedule.kind == "flow"
    alphas_cumprod = None if flow else torch.from_numpy(schedule.alphas_cumprod).float()

    def save(step: int) -> None:
        extra = {k: v.contiguous() for k, v in _optimizer_tensors(opt).items()}
        extra.update({f"model.{k}": v for k, v in model.state_dict().items()})
        save_checkpoint(out, ema.state_dict(), model_cfg, schedule, step, ema=True,
                        extra_files={TRAINING_STATE: extra})

    losses, t0 = [], time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress,
               desc="train", unit="step")
    model.train()
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        # Seeded per step: a resumed run draws the same batches, timesteps and noise.
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        x0, y = data.batch(np.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size))
        y = torch.from_numpy(y)
        y[torch.rand(len(y), generator=gen) < cfg.label_dropout] = model_cfg.null_label
        if flow:
            loss = flow_loss(model, torch.from_numpy(x0), y, schedule.num_timesteps, gen)
        else:
            loss = diffusion_loss(model, torch.from_numpy(x0), y, alphas_cumprod, gen, cfg.min_snr_gamma)
        if not math.isfinite(value := loss.item()):   # never step (or save) on NaN weights
            raise VditError(f"the loss became {value} at step {step + 1}: training diverged (try a lower --lr); "
                            f"{out} keeps its last checkpoint")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # EMA decay warms up so that a short run's EMA is not dominated by the random init.
        ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        losses.append(value)
        if progress and step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{lr:.1e}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save(step + 1)
    bar.close()
    return {"steps": cfg.steps, "final_loss": float(np.mean(losses[-100:])),
            "seconds": time.time() - t0}
