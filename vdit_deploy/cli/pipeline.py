"""`vdit export-decoder`, `vdit encode`, `vdit generate`: the stages around the denoiser, prompt to video."""
from __future__ import annotations

import time
from pathlib import Path

import click

from vdit_deploy.cli.app import Finite, main, needs_torch, threads_option
from vdit_deploy.cli.sample import sampling_options


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
    AutoencoderKL per frame, AutoencoderKLLTXVideo whole clips, AutoencoderKLWan and AutoencoderKLCogVideoX
    chunk by chunk with their feature cache as graph inputs and outputs) to decoder.onnx (+ decoder-chunk.onnx)."""
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


@main.command("export-text-encoder")
@click.argument("pipeline_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The export directory.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="fp16 weights and math (reductions kept fp32), or int8 weights (dynamic quantization); "
                   "float32 inputs and outputs either way.")
@click.option("--tolerance", type=Finite(0, lo_open=True), default=None,
              help="Allowed difference from transformers: fp32 max abs / max |hidden| (1e-4), else relative "
                   "L2 (fp16 1e-2, int8 5e-2).")
def export_text_encoder_cmd(pipeline_dir, out, precision, tolerance):
    """Export a pipeline's text encoder (text_encoder/ + tokenizer/) to text_encoder.onnx and its
    tokenizer.json, checked against transformers: `vdit generate` then encodes new prompts without torch."""
    needs_torch("export-text-encoder")
    from vdit_deploy.text_onnx import export_text_encoder

    start = time.perf_counter()
    path, stats = export_text_encoder(pipeline_dir, out, precision=precision, tolerance=tolerance)
    click.echo(f"exported {path} ({precision}, {path.stat().st_size / 1e6:.1f} MB) in "
               f"{time.perf_counter() - start:.1f} s; max abs difference from transformers {stats['max_abs']:.2e}, "
               f"relative L2 {stats['rel_l2']:.2e}, cosine {stats['cosine']:.6f}")


@main.command()
@click.argument("pipeline_dir", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, required=True, help="A prompt; repeat for one video per prompt.")
@click.option("--negative", default="", show_default=True,
              help="The negative prompt: the null conditioning guidance pairs with each prompt.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="cond.safetensors: the prompts' embeddings, one row each (`vdit sample --cond`).")
@click.option("--null-out", type=click.Path(path_type=Path), default=None,
              help="The negative prompt's embeddings, batch 1 (`vdit export --null`, `vdit sample --null`).")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), default=None,
              help="Prompt cache directory: texts found there are not encoded again, new ones are added "
                   "(EXPORT/prompts is where `vdit generate` looks).")
def encode(pipeline_dir, prompts, negative, out, null_out, cache_dir):
    """Encode prompts with a pipeline's own text_encoder/ and tokenizer/ (T5, umT5; transformers on the
    host), padded and masked as the pipeline (Latte, Wan, CogVideoX) does."""
    from vdit_deploy.errors import VditError
    from vdit_deploy.files import check_output

    if out is None and null_out is None and cache_dir is None:
        raise VditError("give --out, --null-out or --cache (where the embeddings go)")
    for path in (out, null_out):
        if path is not None:
            check_output(path)
    needs_torch("encode")
    from vdit_deploy.text_encoder import TextEncoder, save_conditioning

    start = time.perf_counter()
    cond, null = TextEncoder(pipeline_dir).encode(list(prompts), negative, cache_dir)
    save_conditioning(out, cond, null_out, null)
    click.echo(f"encoded {len(prompts)} prompt(s) + the negative prompt: {list(cond.shape)} in "
               f"{time.perf_counter() - start:.2f} s" + "".join(f"; wrote {p}" for p in (out, null_out) if p)
               + (f"; cache {cache_dir}" if cache_dir else ""))


@main.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, required=True, help="A prompt; repeat for one video per prompt.")
@click.option("--negative", default="", show_default=True, help="The negative prompt (guidance's null conditioning).")
@click.option("--pipeline", "pipeline_dir", type=click.Path(path_type=Path), default=None,
              help="Encode prompts missing from the cache with this pipeline's text encoder (needs torch).")
@click.option("--prompt-cache", "cache_dir", type=click.Path(path_type=Path), default=None,
              help="Prompt cache (default EXPORT_DIR/prompts).")
@sampling_options(runtime_default="ort")
@click.option("--tile", type=click.IntRange(8), default=None, help="VAE decode tile in output pixels (default: "
              "the --target profile's vae_tile, else untiled).")
@click.option("--target", default=None, help="Deployment profile whose vae_tile sets the decode tile.")
@threads_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output .mp4, .gif or .npy (latents).")
def generate(export_dir, prompts, negative, pipeline_dir, cache_dir, sampler, steps, order, spacing, eta, guidance,
             seed, runtime, precision, cache_mode, cache_threshold, cache_warmup, cache_max_skips, tile, target,
             threads, out):
    """Prompt to video over an export that holds the denoiser, decoder.onnx and a prompt cache (or a
    --pipeline to encode with): encode, sample, decode, each with a progress bar, its time and peak memory."""
    from vdit_deploy.errors import VditError
    from vdit_deploy.generate import generate as run

    if runtime == "torch":
        raise VditError("vdit generate runs an export: --runtime ort, ort-trt or trt")
    if tile is None and target is not None:
        from vdit_deploy.runtimes.profiles import load_profile
        tile = load_profile(target).vae_tile or None
    step_cache = None if cache_mode == "off" else dict(mode=cache_mode, threshold=cache_threshold,
                                                         warmup=cache_warmup, max_skips=cache_max_skips)
    report = run(export_dir, list(prompts), out, negative, pipeline_dir, cache_dir, runtime, precision, sampler,
                 steps, guidance, seed, tile, eta, order, spacing, step_cache=step_cache)
    click.echo(report.table())
    click.echo(f"wrote {out} ({threads} CPU thread(s))")
