"""`vdit calibrate ...`: calibration sets, fp16 and INT8 graphs, sensitivity, the accuracy report."""
from __future__ import annotations

from pathlib import Path

import click

from vdit_deploy.cli.app import (COND_ROWS_HELP, GUIDANCE, SAMPLER_HELP, STEPS_HELP, Cli, Finite, human_size, main,
                                 parse_labels, threads_option)
from vdit_deploy.errors import VditError
from vdit_deploy.files import check_output
from vdit_deploy.samplers import DEFAULT_SAMPLER

# ---- calibrate (INT8 / FP16) --------------------------------------------------------------------
@main.group(cls=Cli)
def calibrate():
    """Calibration sets, fp16 and INT8 graphs, per-layer sensitivity and the accuracy report."""


def calib_option(required=True):
    return click.option("--calib", "calib_dir", type=click.Path(path_type=Path), required=required,
                        default=None, help="Calibration set from `vdit calibrate collect`.")


@calibrate.command("collect")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Calibration set directory.")
@click.option("--sampler", default=None,
              help=f"The sampler you deploy (its timesteps are the ones INT8 ranges must cover): {SAMPLER_HELP} "
              f"Default: the model's pipeline's (its scheduler config's), else {DEFAULT_SAMPLER}.")
@click.option("--steps", default=None, type=click.IntRange(1), help=STEPS_HELP)
@click.option("--guidance", default=2.0, show_default=True, type=GUIDANCE)
@click.option("--eta", default=0.0, show_default=True, type=Finite(0))
@click.option("--seeds", default=4, show_default=True, type=click.IntRange(1, 10 ** 6), help="Seeds 0..N-1.")
@click.option("--label", "labels", multiple=True, help="Labels per sample, class models (default: every class).")
@click.option("--cond", "cond_file", type=click.Path(path_type=Path), default=None,
              help=COND_ROWS_HELP + " One row per video of each sample.")
@click.option("--timesteps", default=8, show_default=True, type=click.IntRange(1),
              help="Steps recorded per trajectory, spread from t=T-1 to 0.")
@threads_option
def calibrate_collect(source, out, sampler, steps, guidance, eta, seeds, labels, cond_file, timesteps, threads):
    """Record denoiser inputs (x_t, t and every conditioning input, null rows included) from the fp32
    sampler (SOURCE: model directory or export directory)."""
    import json

    from vdit_deploy.calibration.collect import collect

    path = collect(source, out, sampler, steps, guidance, eta, range(seeds), parse_labels(labels) if labels else None,
                   timesteps, progress=True, cond=cond_file)
    m = json.loads((path / "manifest.json").read_text())
    click.echo(f"wrote {path}: {m['shapes']['x_t'][0]} rows, t = {', '.join(map(str, m['timesteps']))} "
               f"({m['sampler']} {m['steps']} steps, guidance {m['guidance']}, seeds {m['seeds']})")


@calibrate.command("cache")
@click.argument("export_dir", type=click.Path(path_type=Path))
@calib_option()
@click.option("--degree", default=2, show_default=True, type=click.IntRange(1, 8), help="Polynomial degree.")
def calibrate_cache(export_dir, calib_dir, degree):
    """Fit teacache's polynomial (model output change against the modulated input's change between
    consecutive steps) on a calibration set collected with --timesteps equal to --steps; writes
    EXPORT_DIR/cache_fit.json (needs `vdit export --cache-split K`)."""
    from vdit_deploy.calibration.cache_fit import fit_cache

    fit = fit_cache(export_dir, calib_dir, degree)
    click.echo(f"wrote {fit['path']}: poly {', '.join(f'{c:.4g}' for c in fit['poly'])} from {fit['points']} step "
               f"pairs (rms residual {fit['rms_residual']:.2e})")


@calibrate.command("fp16")
@click.argument("export_dir", type=click.Path(path_type=Path))
@calib_option(required=False)
@threads_option
def calibrate_fp16(export_dir, calib_dir, threads):
    """Write denoiser.fp16.onnx and step.fp16.onnx (norms, softmax, pow, exp, the timestep embedding
    and the step's update stay fp32), and decoder.fp16.onnx where the export has a VAE decoder."""
    from vdit_deploy.calibration.fp16 import check_fp16, convert_fp16
    from vdit_deploy.decode import find_decoder
    from vdit_deploy.export.variants import FP16, STEP, variant_file

    path = convert_fp16(export_dir, calib_dir)
    written = [p for p in (path, path.with_name(variant_file(STEP, FP16))) if p.is_file()]
    if find_decoder(export_dir) is not None:              # the VAE's decoder, where the export has one
        from vdit_deploy.export.decoder_verify import convert_decoder_fp16
        written += convert_decoder_fp16(export_dir)
    click.echo(f"wrote {', '.join(f'{p} ({human_size(p.stat().st_size)})' for p in written)}")
    if calib_dir is not None:
        r = check_fp16(export_dir, calib_dir)
        click.echo(f"checked on {r['rows']} calibration rows: no inf/NaN, eps rel L2 {r['eps_rel_l2']:.2e}")


@calibrate.command("int8")
@click.argument("export_dir", type=click.Path(path_type=Path))
@calib_option(required=False)
@click.option("--mode", type=click.Choice(["dynamic", "qdq"]), default="dynamic", show_default=True,
              help="dynamic: fastest on CPU (denoiser.int8-dynamic.onnx); qdq: static Q/DQ (denoiser.int8-qdq.onnx "
              "and step.int8-qdq.onnx), for this CPU's ONNX Runtime or, with --target tensorrt, for TensorRT.")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy"]), default=None,
              help="Activation range calibration for qdq (default: minmax, the measured best).")
@click.option("--keep-fp", multiple=True, help="Layer pattern (regex on e.g. 'blocks.0.mlp.0/linear') kept in float; "
              "replaces the default sensitive set. 'none' quantizes everything.")
@click.option("--target", default=None,
              help="Where the graph runs: vnni (AVX-512 VNNI / AVX-VNNI), avx2 (x86 without VNNI: 7-bit weights, "
              "its u8 x s8 sums saturate otherwise), arm64, tensorrt (qdq: symmetric int8, what `vdit build` takes) or a "
              "board profile (`vdit plan --list`). Default: this CPU (qdq: asymmetric u8 activations).")
@click.option("--t-bins", "t_bins", default=1, show_default=True, type=int,
              help="qdq: one set of activation scales per timestep bin (the set's timesteps split into N); "
              "ONNX Runtime picks each step's bin.")
@click.option("--smooth", default=None, type=float,
              help="SmoothQuant alpha in [0, 1]: migrate activation outliers into the weights (a Mul before "
              "each quantized MatMul).")
@click.option("--float-steps", "float_steps", default=None, type=int,
              help="The first steps of the calibration set's sampler that run in float (the export's fp32 graph, "
              "on ONNX Runtime; any sampler's calls at those timesteps too): they decide each video's layout. "
              "Default: 2 for qdq, 0 for dynamic.")
@threads_option
def calibrate_int8(export_dir, calib_dir, mode, method, keep_fp, target, t_bins, smooth, float_steps, threads):
    """Write an INT8 denoiser graph with the types that do not saturate on its target CPU (recorded in
    the graph); sensitive layers stay float, and with qdq the first steps too."""
    import onnx

    from vdit_deploy.calibration.graph import COMPUTE_OPS, matching
    from vdit_deploy.calibration.int8_bins import check_bins
    from vdit_deploy.calibration.smooth import check_alpha
    from vdit_deploy.calibration.int8 import DEFAULT_METHOD, DEFAULT_SENSITIVE, calibration_error, quantize_int8
    from vdit_deploy.export.metadata import find_onnx
    from vdit_deploy.export.variants import INT8_QDQ, STEP, variant_file
    from vdit_deploy.progress import note
    from vdit_deploy.runtimes.cpu_isa import choose
    from vdit_deploy.runtimes.qdq_bins import float_steps_text

    keep = DEFAULT_SENSITIVE if not keep_fp else (() if keep_fp == ("none",) else keep_fp)
    choice = choose(mode, target)        # a bad --target before any work
    check_bins(t_bins)
    check_alpha(smooth)
    if mode == "qdq":
        note("int8 qdq: calibrating the denoiser and then the step graph on the set, then quantizing "
             "(minutes: every batch runs through the fp32 graph once per 512 MB of the activations Q/DQ ranges)")
    path = quantize_int8(export_dir, calib_dir, mode=mode, method=method or DEFAULT_METHOD, keep_fp=keep,
                         target=target, progress=True, t_bins=t_bins, smooth=smooth, float_steps=float_steps)
    # the patterns that name layers of this model (the default set also holds other families' names)
    kept = matching(onnx.load(str(find_onnx(export_dir)), load_external_data=False), keep, COMPUTE_OPS)
    step = path.with_name(variant_file(STEP, INT8_QDQ))
    also = f", {step} ({human_size(step.stat().st_size)})" if mode == "qdq" and step.is_file() else ""
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    first = float_steps_text(props, str(path))
    steps = f"; in float: calls at {first}" if first else ""
    click.echo(f"wrote {path} ({human_size(path.stat().st_size)}){also}, {choice.describe()}; "
               f"kept in float: {', '.join(kept) or 'nothing'}{steps}")
    if calib_dir is not None:
        click.echo(f"eps rel L2 vs fp32 on the calibration set (every call in INT8): "
                   f"{calibration_error(path, export_dir, calib_dir):.3e}")


@calibrate.command("sensitivity")
@click.argument("export_dir", type=click.Path(path_type=Path))
@calib_option()
@click.option("--mode", type=click.Choice(["dynamic", "qdq"]), default="dynamic", show_default=True)
@click.option("--layers", default=None, help="Regex: only the layer groups it finds (e.g. 'blocks.0').")
@threads_option
def calibrate_sensitivity(export_dir, calib_dir, mode, layers, threads):
    """Quantize one layer at a time and print the eps error each adds, largest first."""
    from vdit_deploy.calibration.sensitivity import sensitivity, table

    click.echo(table(sensitivity(export_dir, calib_dir, mode=mode, layers=layers, progress=True)))


@calibrate.command("report")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--precisions", default="fp16,int8", show_default=True, help="Comma-separated ONNX Runtime precisions (int8: the int8-dynamic graph; int8-qdq).")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1))
@click.option("--seeds", default=2, show_default=True, type=click.IntRange(1))
@click.option("--guidance", default=2.0, show_default=True, type=GUIDANCE)
@click.option("--cond", "cond_file", type=click.Path(path_type=Path), default=None,
              help=COND_ROWS_HELP + " One row per video.")
@click.option("--out", default="calibration-report", show_default=True, type=click.Path(path_type=Path))
@threads_option
def calibrate_report(export_dir, precisions, steps, seeds, guidance, cond_file, out, threads):
    """Each precision vs fp32, same noise and conditioning: output error per timestep (plot), PSNR/SSIM,
    GIF grid."""
    from vdit_deploy.calibration.report import accuracy_report, summary

    check_output(out / "report.json")
    report = accuracy_report(export_dir, [p for p in precisions.split(",") if p], steps, range(seeds),
                             out_dir=out, guidance=guidance, cond=cond_file)
    click.echo(summary(report))
    click.echo(f"wrote {out}/: {', '.join(str(v) for k, v in report['files'].items() if k != 'gif_columns')}")
    for note in report["notes"]:
        click.echo(f"note: {note}")
    missed = [p for p, r in report["results"].items() if not r["meets_target"]]
    if missed:
        raise VditError(f"{', '.join(missed)} missed the PSNR target against fp32 (report in {out})")


@calibrate.command("trt-cache")
@click.argument("export_dir", type=click.Path(path_type=Path))
@calib_option()
@click.option("--batch", default=2, show_default=True, type=click.IntRange(1), help="Calibration batch size.")
def calibrate_trt_cache(export_dir, calib_dir, batch):
    """TensorRT implicit-INT8 calibration cache (TensorRT 10.x weakly typed, e.g. JetPack 6; 11.x uses Q/DQ) from the set; needs a GPU."""
    from vdit_deploy.runtimes.trt_build import calibration_cache

    facts = calibration_cache(export_dir, calib_dir, batch, log=click.echo)
    if facts["calibration_cache_reused"]:
        click.echo(f"reused {facts['calibration_cache']} (delete it to calibrate again)")
    else:
        click.echo(f"wrote {facts['calibration_cache']}")
