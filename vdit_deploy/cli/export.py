"""`vdit export` and `vdit verify`: ONNX graphs from a model directory, checked against PyTorch."""
from __future__ import annotations

import time
from pathlib import Path

import click

from vdit_deploy.cli.app import Finite, human_size, main, needs_torch, parse_batch_range, parse_ints, threads_option

# ---- export / verify (ONNX) ---------------------------------------------------------------------
def print_verify(export_dir, checkpoint, tolerance, class_name=None):
    needs_torch("verify")
    from vdit_deploy.decode import find_decoder
    from vdit_deploy.export.variants import DENOISER, find_variant
    from vdit_deploy.export.verify import VerifyReport, check, verify

    from vdit_deploy.progress import shown

    decoder = find_decoder(export_dir) is not None
    if decoder and find_variant(export_dir, DENOISER) is None:     # a decoder exported on its own
        report = VerifyReport(tolerance)
    else:
        report = verify(export_dir, checkpoint=checkpoint, tolerance=tolerance, class_name=class_name,
                        progress=shown())
    if decoder:                                                     # against diffusers' own decode
        from vdit_deploy.export.decoder_verify import verify_decoder
        report.rows += verify_decoder(export_dir, tolerance=tolerance)
    click.echo(report.table())
    check(report, export_dir)


def null_tokens(out: Path) -> None:
    """A text model's null conditioning fixes the token count of every guided call: say which."""
    from vdit_deploy.contract import load_null
    from vdit_deploy.export.metadata import find_onnx, read_metadata

    contract = read_metadata(find_onnx(out)).contract
    sizes = contract.axis_sizes(load_null(contract, out)) if contract.axes else {}
    if sizes:
        click.echo(f"note: guided sampling pairs each prompt with the null conditioning: prompts take "
                   f"{', '.join(f'{k} = {v}' for k, v in sizes.items())} like it (pad them to it, or export the "
                   "empty prompt padded to your prompts' length)")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Export directory (replaced atomically).")
@click.option("--class", "class_name", default=None,
              help="diffusers model: its ModelMixin class as module:Class (default: config.json's _class_name "
                   "in diffusers; LatteTransformer3DModel needs nothing else).")
@click.option("--input", "inputs", multiple=True,
              help="diffusers model other than Latte: a conditioning input NAME:DTYPE:DIMS, the batch axis "
                   "implied, named axes dynamic (e.g. encoder_hidden_states:float32:seq,4096); repeat in forward order.")
@click.option("--latent", default=None, help="diffusers model other than Latte: the latent shape C,F,H,W.")
@click.option("--output", "output_kind", type=click.Choice(["eps", "eps+var", "v", "x0"]), default=None,
              help="What the model predicts (default: from the scheduler config and the channel counts; refused "
                   "when they cannot tell).")
@click.option("--scheduler-config", type=click.Path(path_type=Path), default=None,
              help="diffusers scheduler_config.json: the schedule and the prediction type (default: beside the "
                   "model or in ../scheduler; an export without one is refused, not guessed).")
@click.option("--null", "null_file", type=click.Path(path_type=Path), default=None,
              help="The null conditioning for guidance (.safetensors, batch 1: the empty prompt's embeddings). "
                   "Default: zeros.")
@click.option("--seq", default=None, help="Range MIN:MAX of the named (token) axes the graphs take (default 1:120).")
@click.option("--batch", default="1:8", show_default=True, help="Dynamic batch range MIN:MAX (videos per call).")
@click.option("--fixed-batch", type=click.IntRange(1), default=None, help="Static batch N (edge builds).")
@click.option("--opset", default=18, show_default=True, type=click.IntRange(17, 23),
              help="ONNX opset, 17 (LayerNormalization) .. 23 (the newest torch's exporter writes).")
@click.option("--cache-split", type=click.IntRange(1), default=None,
              help="Also write step caching's graphs cut after block K (denoiser-head/-tail, step-head/-tail): "
                   "`vdit sample --cache` skips the tail on steps where the head's input barely changed.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Compare with PyTorch after export.")
@click.option("--tolerance", default=1e-4, show_default=True, type=Finite(0, lo_open=True),
              help="fp32 error allowed by --verify (relative L2, see `vdit verify --help`).")
@threads_option
def export(checkpoint, out, class_name, inputs, latent, output_kind, scheduler_config, null_file, seq, batch,
           fixed_batch, opset, cache_split, verify, tolerance, threads):
    """Export a model directory (a vdit checkpoint, or a diffusers save_pretrained directory with
    safetensors weights) to denoiser.onnx, the fused step.onnx and null_cond.safetensors, with the model
    contract in their metadata, and verify them."""
    needs_torch("export")
    from vdit_deploy.export.metadata import export_own_files
    from vdit_deploy.export.onnx_export import export_checkpoint

    batch_range = parse_batch_range(batch)        # options first: nothing is loaded or traced before they hold
    options = dict(class_name=class_name, inputs=inputs, output=output_kind, scheduler_config=scheduler_config,
                   null_file=null_file, seq=parse_batch_range(seq, "--seq") if seq else None,
                   latent=parse_ints(latent, "--latent", 4) if latent else None)
    export_own_files(out)
    from vdit_deploy.progress import shown

    start = time.perf_counter()
    export_checkpoint(checkpoint, out, batch=batch_range, fixed=fixed_batch, opset=opset, progress=shown(),
                      cache_split=cache_split, **options)
    sizes = ", ".join(f"{p.name} {human_size(p.stat().st_size)}" for p in sorted(out.iterdir()))
    click.echo(f"exported {out}: {sizes} in {time.perf_counter() - start:.1f} s")
    null_tokens(out)
    if verify:
        print_verify(out, checkpoint, tolerance, class_name)


@main.command("verify")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="The source checkpoint (default: the path recorded at export).")
@click.option("--tolerance", default=1e-4, show_default=True, type=Finite(0, lo_open=True),
              help="Error allowed for the fp32 graphs; fp16/int8 variants have their own (export/verify.py).")
@click.option("--class", "class_name", default=None,
              help="A model exported with --class module:Class that is not diffusers' own: the same class again "
                   "(an export's metadata never makes vdit import a module).")
@threads_option
def verify_cmd(export_dir, checkpoint, tolerance, class_name, threads):
    """Compare every graph of an export (fp32 and each fp16/int8 variant) with PyTorch on a real sampling
    trajectory; exit 1 above tolerance or when nothing could be checked. Error is relative L2 against the
    output's scale: ||eps|| for a denoiser, the sum of the update's term magnitudes for a step."""
    print_verify(export_dir, checkpoint, tolerance, class_name)
