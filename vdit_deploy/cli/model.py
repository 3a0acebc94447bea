"""`vdit info` and `vdit train`: what a model holds, and training the built-in model."""
from __future__ import annotations

from pathlib import Path

import click

from vdit_deploy.cli.app import SEED, Finite, main, threads_option

# ---- info ---------------------------------------------------------------------------------------
@main.command()
@click.argument("path", required=False, type=click.Path(path_type=Path))
def info(path):
    """Presets with parameter and FLOP counts, or what a checkpoint, diffusers model directory or export holds."""
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
        from vdit_deploy.decode import describe_decoder
        from vdit_deploy.export.metadata import describe_onnx
        from vdit_deploy.export.variants import DECODER_KINDS, all_variant_files
        from vdit_deploy.runtimes.qdq_bins import int8_lines

        if path.is_file() and path.name in all_variant_files(DECODER_KINDS):
            click.echo(describe_decoder(path))
            return
        files = sorted(path.glob("*.onnx")) if path.is_dir() else [path]
        for file in files:
            if file.name in all_variant_files(DECODER_KINDS):
                continue
            click.echo(describe_onnx(file))
            for line in int8_lines(file):      # types, first steps in float, per-bin scales: INT8 graphs only
                click.echo(f"  {line}")
        for file in files:
            if file.name in all_variant_files(DECODER_KINDS):
                click.echo(describe_decoder(file))
        return
    from vdit_deploy.describe import describe_diffusers_dir
    from vdit_deploy.sources import is_diffusers_dir

    if is_diffusers_dir(path):
        click.echo(describe_diffusers_dir(path))
        return
    from vdit_deploy.checkpoint import read_info

    ckpt = read_info(path)
    cfg = ckpt.model
    click.echo(f"checkpoint  {ckpt.path}  (step {ckpt.step}, {'EMA' if ckpt.ema else 'raw'} weights)")
    click.echo(f"schedule    {ckpt.schedule.describe()}")
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
@click.option("--lr", default=8e-4, show_default=True, type=Finite(0, lo_open=True))
@click.option("--schedule", type=click.Choice(["linear", "cosine"]), default="cosine", show_default=True,
              help="DDPM: cosine keeps more of T informative at these small frame sizes (Nichol & Dhariwal).")
@click.option("--objective", type=click.Choice(["ddpm", "flow"]), default="ddpm", show_default=True,
              help="ddpm: eps-prediction on --schedule; flow: flow matching (the velocity noise - x0, t = sigma * 1000).")
@click.option("--init", type=click.Path(path_type=Path), default=None,
              help="Start a new run from this checkpoint's weights (same preset), e.g. flow from the shipped DDPM one.")
@click.option("--attention", type=click.Choice(["factorized", "factorized_dot_product", "joint"]),
              default=None, help="Override the preset's attention mode.")
@click.option("--checkpoint-every", default=250, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Run directory; it is a checkpoint (EMA weights) and resumes if it exists.")
@threads_option
def train(preset_name, steps, batch_size, lr, schedule, objective, init, attention, checkpoint_every, seed, out,
          threads):
    """Train on the generated Moving Shapes videos (resumable)."""
    from vdit_deploy.config import preset
    from vdit_deploy.flow import FlowSchedule
    from vdit_deploy.schedules import Schedule
    from vdit_deploy.train import TrainConfig, moving_shapes_config, train as run_training

    cfg, note = moving_shapes_config(preset(preset_name, **({"attention": attention} if attention else {})))
    if note:
        click.echo(f"note: {note}")
    result = run_training(cfg, out, TrainConfig(steps=steps, batch_size=batch_size, lr=lr,
                                                checkpoint_every=checkpoint_every, seed=seed),
                          FlowSchedule() if objective == "flow" else Schedule(schedule), init=init)
    click.echo(f"trained to step {result['steps']} in {result['seconds'] / 60:.1f} min ({threads} CPU thread(s)), "
               f"final loss {result['final_loss']:.4f}; checkpoint: {out}")
