"""`vdit`: the command line. Every user error is one line on stderr and a non-zero exit."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from vdit_deploy.errors import VditError

SHIPPED_HELP = "the shipped tiny demo checkpoint"


class Cli(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VditError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)


@click.group(cls=Cli)
@click.version_option(package_name="vdit-deploy")
def main():
    """vdit-deploy: a video diffusion transformer from checkpoint to a fast, verified sampler."""


def parse_labels(labels: tuple[str, ...]) -> list[int]:
    try:
        return [int(v) for item in labels for v in item.split(",")]
    except ValueError:
        raise VditError(f"--label takes integers, got {' '.join(labels)}") from None


# ---- info ---------------------------------------------------------------------------------------
@main.command()
@click.argument("path", required=False, type=click.Path(path_type=Path))
def info(path):
    """Presets with parameter and FLOP counts, or what a checkpoint or export holds."""
    from vdit_deploy.config import PRESETS

    if path is None:
        click.echo(f"{'preset':<6} {'width':>5} {'depth':>5} {'heads':>5} {'input (C,F,H,W)':>16} "
                   f"{'tubelet':>8} {'tokens':>6} {'params':>9} {'GFLOP/call':>10}")
        for name, cfg in PRESETS.items():
            click.echo(f"{name:<6} {cfg.hidden_size:>5} {cfg.depth:>5} {cfg.num_heads:>5} "
                       f"{'x'.join(map(str, cfg.video_shape)):>16} {'x'.join(map(str, cfg.tubelet)):>8} "
                       f"{cfg.num_tokens:>6} {cfg.num_params() / 1e6:>8.2f}M {cfg.flops() / 1e9:>10.2f}")
        click.echo("GFLOP/call: one denoiser forward at batch 1 (2 x multiply-adds, factorized attention).")
        return
    if path.suffix == ".onnx" or (path.is_dir() and any(path.glob("*.onnx"))):
        from vdit_deploy.export.metadata import describe_onnx
        click.echo(describe_onnx(path))
        return
    from vdit_deploy.checkpoint import read_info

    ckpt = read_info(path)
    cfg = ckpt.model
    click.echo(f"checkpoint  {ckpt.path}  (step {ckpt.step}, {'EMA' if ckpt.ema else 'raw'} weights)")
    click.echo(f"schedule    {ckpt.schedule.kind}, T={ckpt.schedule.num_timesteps}")
    for key, value in cfg.to_dict().items():
        click.echo(f"{key:<16}{value}")
    click.echo(f"tokens      {cfg.num_tokens} (grid {'x'.join(map(str, cfg.grid))})")
    click.echo(f"params      {cfg.num_params():,}")
    click.echo(f"GFLOP/call  {cfg.flops() / 1e9:.3f} at batch 1")


# ---- train --------------------------------------------------------------------------------------
@main.command()
@click.option("--preset", "preset_name", default="tiny", show_default=True, help="Model size.")
@click.option("--steps", default=3000, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=5e-4, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--schedule", type=click.Choice(["linear", "cosine"]), default="linear", show_default=True)
@click.option("--attention", type=click.Choice(["factorized", "factorized_dot_product", "joint"]),
              default=None, help="Override the preset's attention mode.")
@click.option("--checkpoint-every", default=250, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Run directory; it is a checkpoint (EMA weights) and resumes if it exists.")
def train(preset_name, steps, batch_size, lr, schedule, attention, checkpoint_every, seed, out):
    """Train on the generated Moving Shapes videos (resumable)."""
    from vdit_deploy.config import preset
    from vdit_deploy.diffusion import Schedule
    from vdit_deploy.train import TrainConfig, train as run_training

    cfg = preset(preset_name, **({"attention": attention} if attention else {}))
    if cfg.in_channels != 3 or cfg.num_classes > 4:
        cfg = cfg.replace(in_channels=3, num_classes=4)   # latent presets, trained on RGB Moving Shapes
    result = run_training(cfg, out, TrainConfig(steps=steps, batch_size=batch_size, lr=lr,
                                                checkpoint_every=checkpoint_every, seed=seed),
                          Schedule(schedule))
    click.echo(f"trained to step {result['steps']} in {result['seconds'] / 60:.1f} min, "
               f"final loss {result['final_loss']:.4f}; checkpoint: {out}")


# ---- sample / demo ------------------------------------------------------------------------------
def sampling_options(f):
    for option in reversed([
        click.option("--sampler", type=click.Choice(["ddim", "ddpm"]), default="ddim", show_default=True),
        click.option("--steps", default=50, show_default=True, type=int,
                     help="DDIM steps (1..T); DDPM always runs all T."),
        click.option("--eta", default=0.0, show_default=True, type=float, help="DDIM noise (0: deterministic)."),
        click.option("--guidance", default=2.0, show_default=True, type=float,
                     help="Classifier-free guidance scale (1: off)."),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--runtime", default="torch", show_default=True,
                     help="torch (checkpoint) or ort (ONNX export, no torch needed)."),
        click.option("--precision", default="fp32", show_default=True, help="fp32, fp16, bf16 (runtime-dependent)."),
    ]):
        f = option(f)
    return f


def run_sampler(runtime_name, artifact, precision, labels, sampler, steps, eta, guidance, seed, options=None):
    from vdit_deploy.diffusion import make_steps
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import SampleTimes, check_labels, sample

    with open_runtime(runtime_name, artifact, precision=precision, **(options or {})) as rt:
        check_labels(labels, rt.config)
        plan = make_steps(rt.schedule, sampler, None if sampler == "ddpm" else steps, eta)
        times = SampleTimes()
        videos = sample(rt, rt.config, labels, plan, guidance, seed, progress=True, times=times)
        return videos, times, rt.describe()


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help=f"Default: {SHIPPED_HELP}.")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), default=None,
              help="Export directory or .onnx file (for --runtime ort).")
@click.option("--label", "labels", multiple=True, default=("0",), show_default=True,
              help="Class label(s); repeat or comma-separate for several videos.")
@sampling_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output .gif, .mp4 or .npy.")
def sample(checkpoint, onnx_path, labels, sampler, steps, eta, guidance, seed, runtime, precision, out):
    """Sample videos with DDPM or DDIM from a checkpoint or an ONNX export."""
    from vdit_deploy.video import check_suffix, write_video

    check_suffix(out)
    if runtime == "torch":
        from vdit_deploy.checkpoint import SHIPPED
        artifact = checkpoint or SHIPPED
    else:
        if onnx_path is None:
            raise VditError(f"--runtime {runtime} samples from an export: pass --onnx DIR (see `vdit export`)")
        artifact = onnx_path
    videos, times, desc = run_sampler(runtime, artifact, precision, parse_labels(labels), sampler, steps,
                                      eta, guidance, seed)
    write_video(out, videos)
    click.echo(f"wrote {out}: {len(videos)} video(s), {len(times.steps)} steps in {times.total:.2f} s ({desc})")


@main.command()
@click.option("--out", default="demo.gif", show_default=True, type=click.Path(path_type=Path))
@click.option("--seeds", default=2, show_default=True, type=click.IntRange(1, 8), help="Rows of the grid.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--guidance", default=2.0, show_default=True, type=float)
def demo(out, seeds, steps, guidance):
    """Sample every class of the shipped checkpoint (DDIM) into one GIF grid."""
    import numpy as np

    from vdit_deploy.checkpoint import SHIPPED, read_info
    from vdit_deploy.data import CLASS_NAMES
    from vdit_deploy.video import check_suffix, write_video

    check_suffix(out)
    cfg = read_info(SHIPPED).model
    labels = [c for _ in range(seeds) for c in range(cfg.num_classes)]
    videos, times, desc = run_sampler("torch", SHIPPED, "fp32", labels, "ddim", steps, 0.0, guidance, seed=0)
    write_video(out, videos, columns=cfg.num_classes)
    click.echo(f"wrote {out}: columns {', '.join(CLASS_NAMES[:cfg.num_classes])}; {seeds} seed(s) each; "
               f"{steps} DDIM steps, guidance {guidance}, {times.total:.2f} s ({desc})")


if __name__ == "__main__":
    main()
