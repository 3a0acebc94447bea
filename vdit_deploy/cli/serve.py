"""`vdit serve-export`: an NVIDIA Triton model repository from an export."""
from __future__ import annotations

from pathlib import Path

import click

from vdit_deploy.cli.app import main

# ---- serve-export (NVIDIA Triton model repository) ----------------------------------------------
@main.command("serve-export")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--triton", "triton_dir", required=True, type=click.Path(path_type=Path),
              help="Model repository to write (replaced atomically).")
@click.option("--engine", type=click.Path(path_type=Path), default=None,
              help="Serve this `vdit build` denoiser engine (.engine with its .json manifest) instead of the ONNX.")
@click.option("--precision", default="fp32", show_default=True, help="ONNX variant to serve (fp32, fp16, int8...).")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1),
              help="Denoiser instances per GPU.")
def serve_export(export_dir, triton_dir, engine, precision, instances):
    """Write an NVIDIA Triton model repository: the denoiser with dynamic batching + the sampler loop."""
    from vdit_deploy.export.triton import write_triton_repo

    notes = write_triton_repo(export_dir, triton_dir, engine=engine, precision=precision, instances=instances)
    click.echo(f"wrote Triton model repository {triton_dir}")
    for note in notes:
        click.echo(f"  {note}")
    click.echo("  start it: see docs/serving.md (tritonserver --model-repository ...)")
