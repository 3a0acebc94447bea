"""`vdit export-decoder`, `vdit encode`, `vdit generate`: the stages around the denoiser, prompt to video."""
from __future__ import annotations

import time
from pathlib import Path

import click

from vdit_deploy.cli.app import Finite, main, needs_torch


@main.command("export-decoder")
@click.argument("vae_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="The export directory (beside denoiser.onnx: `vdit sample --out x.mp4` then decodes) or a new one.")
@click.option("--frames", type=click.IntRange(1), default=None,
              help="Latent frames per video (default: the denoiser's in --out; CogVideoX's first chunk depends on it).")
@click.option("--tile", type=click.IntRange(8), default=None,
              help="Default spatial tile in output pixels recorded in the metadata (default: the class's diffusers tile).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare with diffusers' own decode (untiled and tiled) after export.")
@click.option("--tolerance", default=1e-4, show_default=True, type=Finite(0, lo_open=True),
              help="fp32 relative L2 allowed by --verify.")
def export_decoder_cmd(vae_dir, out, frames, tile, verify, tolerance):
    """Export a pipeline's VAE decoder (vae/ as diffusers save_pretrained writes it, safetensors only:
    AutoencoderKL per frame, AutoencoderKLWan and AutoencoderKLCogVideoX chunk by chunk with their
    feature cache as graph inputs and outputs) to decoder.onnx (+ decoder-chunk.onnx)."""
    needs_torch("export-decoder")
    from vdit_deploy.export.decoder_export import export_decoder
    from vdit_deploy.export.verify import VerifyReport, check

    start = time.perf_counter()
    files = export_decoder(vae_dir, out, frames=frames, tile=tile)
    click.echo(f"exported {', '.join(f'{p.name} {p.stat().st_size / 1e6:.1f} MB' for p in files)} into {out} "
               f"in {time.perf_counter() - start:.1f} s")
    if verify:
        from vdit_deploy.export.decoder_verify import verify_decoder
        report = VerifyReport(tolerance, verify_decoder(out, vae_dir, tolerance), polygraphy="not run for decoders")
        click.echo(report.table())
        check(report, out)
