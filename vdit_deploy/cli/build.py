"""`vdit plan` and `vdit build`: a deployment target's memory, and TensorRT engines."""
from __future__ import annotations

from pathlib import Path

import click

from vdit_deploy.cli.app import main
from vdit_deploy.errors import VditError
from vdit_deploy.export.variants import ENGINE_PRECISIONS

# ---- plan (memory planner for a deployment target) ---------------------------------------------
@main.command()
@click.option("--target", default=None, help="Profile name (orin-nano, orin-nx, agx-orin, desktop-gpu) or a .json path.")
@click.option("--preset", "preset_name", default=None, help="Plan for a preset (tiny, S, B, L, XL).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="Plan for a checkpoint's config.")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), default=None,
              help="Plan for an export (its config and real ONNX size; another architecture: sized from its graph).")
@click.option("--batch", type=click.IntRange(1), default=None, help="Videos per call. Default: the profile's max.")
@click.option("--precision", type=click.Choice(ENGINE_PRECISIONS), default=None,
              help="Default: the profile's.")
@click.option("--frames", type=click.IntRange(1), default=None, help="Override the number of latent frames.")
@click.option("--list", "list_targets", is_flag=True, help="List the shipped profiles and exit.")
def plan(target, preset_name, checkpoint, onnx_path, batch, precision, frames, list_targets):
    """Estimate the memory an engine needs on a target board; exit 1 if it will not fit."""
    from vdit_deploy.config import ModelConfig
    from vdit_deploy.runtimes.profiles import PROFILE_DIR, load_profile, model_for_plan, plan_memory, profile_names

    if list_targets:
        for name in profile_names():
            click.echo(load_profile(name).describe())
        click.echo(f"(profiles live in {PROFILE_DIR}; copy one, edit it, pass its path to --target)")
        return
    if target is None:
        raise VditError("--target is required (see `vdit plan --list`)")
    profile = load_profile(target)
    cfg, onnx_bytes, what = model_for_plan(preset_name, checkpoint, onnx_path,
                                           sizes={name: r[2] for name, r in profile.axes.items()})
    if frames is not None:
        if not isinstance(cfg, ModelConfig):
            raise VditError("--frames applies to the built-in model; another architecture's frame count is fixed "
                            "in its graph (re-export it for other frames)")
        cfg = cfg.replace(frames=frames)
    result = plan_memory(cfg, batch or profile.batch[2], precision or profile.precision, profile,
                         onnx_bytes=onnx_bytes)
    if onnx_path is not None:                   # the export's VAE decoder, resident beside the denoiser
        from vdit_deploy.runtimes.decoder_plan import decoder_rows
        extra = decoder_rows(onnx_path, result.precision, profile.vae_tile, cfg.video_shape)
        if extra:
            result.rows.update(extra)
            result.notes.append("the decoder's engine is resident beside the denoiser's (vdit generate runs both in "
                                "one process): its rows are added; tile from the profile's vae_tile")
    click.echo(f"{what}")
    click.echo(result.table())
    result.check()


# ---- build (TensorRT) ---------------------------------------------------------------------------
@main.command()
@click.argument("onnx_dir", type=click.Path(path_type=Path))
@click.option("--precision", type=click.Choice(ENGINE_PRECISIONS), default=None,
              help="Default: the target's, else fp16. int8 builds the Q/DQ graph from `vdit calibrate int8 "
              "--mode qdq --target tensorrt` (or a board profile).")
@click.option("--batch", default=None, help="Engine batch range MIN:OPT:MAX (default 1:2:8 within the export's "
              "range, or the target's).")
@click.option("--fixed-batch", type=click.IntRange(1), default=None, help="Static batch N (MIN=OPT=MAX=N).")
@click.option("--seq", default=None,
              help="Token-count range MIN:OPT:MAX of a text-conditioned export (default: the export's range, OPT=MAX).")
@click.option("--target", default=None, help="Deployment profile (orin-nano, agx-orin, desktop-gpu... or a JSON file).")
@click.option("--workspace", type=click.IntRange(1), default=None, help="Builder workspace limit, MB.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=None, help="TensorRT builder optimization level.")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), default=None,
              help="Engine cache directory (default ONNX_DIR/engines).")
@click.option("--no-build", is_flag=True, help="Only check the cache: fail, saying what differs, if an engine is stale.")
def build(onnx_dir, precision, batch, fixed_batch, seq, target, workspace, opt_level, cache_dir, no_build):
    """Compile an export's step.onnx and denoiser.onnx into cached TensorRT engines (one optimization
    profile over the batch and the model contract's named axes), and its VAE decoder.onnx where it has
    one (`vdit export-decoder`: one video's latent frames, the target's vae_tile)."""
    from vdit_deploy.runtimes.trt_build import build_export

    for b in build_export(onnx_dir, precision, batch, fixed_batch, target, workspace, opt_level, cache_dir,
                          build=not no_build, seq=seq, log=click.echo):
        how = f"built in {b.engine.manifest.get('build_seconds', 0):.1f} s" if b.built else "cached, up to date"
        click.echo(f"{b.kind:<9} {b.engine.path}  ({b.engine.path.stat().st_size / 1e6:.1f} MB, {b.precision}, "
                   f"batch {b.profile}, {how})")
