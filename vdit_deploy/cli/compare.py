"""`vdit compare`: every runtime and precision side by side."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from vdit_deploy.cli.app import (COND_ROWS_HELP, GUIDANCE, SAMPLER_HELP, STEPS_HELP, Finite, main, parse_batch_range,
                                 threads_option)
from vdit_deploy.files import check_output
from vdit_deploy.samplers import DEFAULT_SAMPLER

# ---- compare (every runtime side by side) -------------------------------------------------------
@main.command()
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option("--runtimes", default="torch:fp32,ort:fp32,ort:fp16,ort:int8,trt:fp16,trt:int8", show_default=True,
              help="RUNTIME:PRECISION list; those that cannot run here are listed as skipped, with the reason.")
@click.option("--steps", default=None, type=click.IntRange(1), help=STEPS_HELP)
@click.option("--sampler", default=None, help=f"{SAMPLER_HELP} Default: the model's pipeline's (its scheduler "
              f"config's), else {DEFAULT_SAMPLER}. The calibration set for INT8 follows it.")
@click.option("--guidance", default=2.0, show_default=True, type=GUIDANCE)
@click.option("--batch", "batches", default="1,4", show_default=True, help="Batch sizes (videos per sample).")
@click.option("--seeds", default="0-1", show_default=True, help="Seeds, e.g. 0-3 or 0,5.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1), help="Timed samples after 1 warm-up.")
@threads_option
@click.option("--min-psnr", default=30.0, show_default=True, type=Finite(), help="Rows under this PSNR (dB) turn red.")
@click.option("--cond", "cond_file", type=click.Path(path_type=Path), default=None,
              help=COND_ROWS_HELP + " Video i of seed s takes row (s + i) % rows.")
@click.option("--null", "null_file", type=click.Path(path_type=Path), default=None,
              help="A diffusers model directory's null conditioning (.safetensors, batch 1), as `vdit export --null` "
                   "takes it (an export carries its own). Default: zeros.")
@click.option("--seq", default=None,
              help="A diffusers model directory: the token range MIN:MAX its export takes, as `vdit export --seq`.")
@click.option("--cache", "cache", default=None,
              help="Step-caching settings MODE[:THRESHOLD], comma-separated (fbcache:0.05,fbcache:0.1,teacache:0.1): "
                   "a row per ort/torch/trt runtime and setting, speed-up and PSNR/SSIM against that runtime "
                   "uncached; several thresholds make the sweep plot cache_sweep.png. A model directory is "
                   "exported with --cache-split 1.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Report directory: report.json, report.md, plots, samples.gif, cached artifacts/.")
def compare(source, runtimes, steps, sampler, guidance, batches, seeds, repeats, threads, min_psnr, cond_file,
            null_file, seq, cache, out):
    """Latency and accuracy of every runtime and precision, side by side (SOURCE: model directory or
    export directory; default: the shipped checkpoint). Every runtime samples with the same noise and
    conditioning: class labels, or the rows of --cond for a text-conditioned model."""
    import shlex

    from vdit_deploy.checkpoint import SHIPPED
    from vdit_deploy.compare import compare as run_compare, format_table, parse_ints

    check_output(out / "report.json")
    settings = None
    if cache:
        from vdit_deploy.compare.cache_rows import parse_cache
        settings = parse_cache(cache)

    report = run_compare(source or SHIPPED, out, runtimes, steps=steps, batches=parse_ints(batches, "--batch"),
                         seeds=parse_ints(seeds, "--seeds"), sampler=sampler, guidance=guidance, repeats=repeats,
                         threads=threads, min_psnr=min_psnr, log=lambda m: click.echo(m, err=True),
                         command=shlex.join(["vdit", *sys.argv[1:]]), cond=cond_file, null=null_file,
                         seq=parse_batch_range(seq, "--seq") if seq else None, cache=settings)
    click.echo(format_table(report, color=True))
    if report.get("cache"):
        from vdit_deploy.compare.cache_rows import format_cache_table
        click.echo(format_cache_table(report["cache"]))
    for note in report["notes"]:
        click.echo(f"note: {note}")
    click.echo(f"reference {report['reference']}; wrote {out / 'report.json'}, {out / 'report.md'}"
               + "".join(f", {out / f}" for k, f in report["files"].items() if f and k not in ("json", "markdown")))
