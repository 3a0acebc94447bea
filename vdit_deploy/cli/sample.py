"""`vdit sample` and `vdit demo`: sampling on any runtime."""
from __future__ import annotations

from pathlib import Path

import click

from vdit_deploy.cli.app import (GUIDANCE, SEED, SHIPPED_HELP, SAMPLER_HELP, STEPS_HELP, Finite, main, parse_labels,
                                 threads_option)
from vdit_deploy.errors import VditError
from vdit_deploy.export.variants import precisions_help
from vdit_deploy.files import check_output
from vdit_deploy.runtimes.base import COMPILE_MODES
from vdit_deploy.samplers import DEFAULT_SAMPLER

# ---- sample / demo ------------------------------------------------------------------------------
def sampling_options(f=None, *, runtime_default: str = "torch"):
    """The sampler and runtime options of sample (and of generate, which runs an export: runtime_default ort)."""
    if f is None:
        return lambda g: sampling_options(g, runtime_default=runtime_default)
    for option in reversed([
        click.option("--sampler", default=None, help=SAMPLER_HELP + " Default: the model's pipeline's (from its "
                     f"scheduler config: Wan unipc, LTX euler, CogVideoX ddim...), else {DEFAULT_SAMPLER}."),
        click.option("--steps", default=None, type=int, help=STEPS_HELP),
        click.option("--order", default=None, type=int, help="dpm++ / unipc order: 1 or 2 (default 2)."),
        click.option("--spacing", default=None,
                     help="ddim / dpm++ / unipc timestep spacing: linspace, leading or trailing (as in diffusers; "
                          "default: the scheduler config's, else linspace). Not for flow models."),
        click.option("--eta", default=0.0, show_default=True, type=Finite(0), help="DDIM noise (0: deterministic)."),
        click.option("--guidance", default=2.0, show_default=True, type=GUIDANCE,
                     help="Classifier-free guidance scale (1: off)."),
        click.option("--seed", default=0, show_default=True, type=SEED),
        click.option("--runtime", default=runtime_default, show_default=True,
                     help="torch (checkpoint), or ort / trt / ort-trt (ONNX export, no torch needed; "
                          "trt loads the engines `vdit build` made)."),
        click.option("--precision", default="fp32", show_default=True, help=precisions_help()),
        click.option("--cache", "cache_mode", type=click.Choice(["off", "fbcache", "teacache"]), default="off",
                     show_default=True,
                     help="Step caching (an export from `vdit export --cache-split K`, or --runtime torch): skip "
                          "the blocks after the head when its input barely changed. fbcache: the head's residual; "
                          "teacache: the modulated input, rescaled by `vdit calibrate cache`'s fit. Costs "
                          "quality: check it with `vdit compare --cache`."),
        click.option("--cache-threshold", type=Finite(0), default=None,
                     help="Skip while the change is under this (default fbcache 0.08, teacache 0.1)."),
        click.option("--cache-warmup", type=click.IntRange(0), default=2, show_default=True,
                     help="The first and last N steps always run in full."),
        click.option("--cache-max-skips", type=click.IntRange(0), default=3, show_default=True,
                     help="Skipped steps in a row at most."),
    ]):
        f = option(f)
    return f


def run_sampler(runtime_name, artifact, precision, labels, sampler, steps, eta, guidance, seed, options=None,
                order=None, spacing=None, cond_file=None, out=None, cache=None, tile=None):
    """Open the runtime, turn --label or --cond into the model's conditioning, check `out` can show it
    (a latent model's .gif/.mp4 through the export's VAE decoder), sample, decode."""
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import SampleTimes, conditioning, sample, sampler_plan

    with open_runtime(runtime_name, artifact, precision=precision, **(options or {})) as rt:
        contract = rt.contract
        decoder = None
        if out is not None:                          # before sampling: what draws the latents (decode.py)
            from vdit_deploy.generate import video_decoder
            decoder = video_decoder(out, runtime_name, artifact, contract.latent, tile, precision=precision)
        default = None if cond_file else [0]         # one video of class 0 unless --cond gives the rows
        cond = conditioning(contract, labels or default, cond_file)   # a text model refuses labels here
        if guidance != 1.0:    # before the first step: a null conditioning of another length is refused
            contract.null_batch(rt.null, cond)
        plan = sampler_plan(contract, sampler, steps, eta, order, spacing)
        if getattr(rt, "compile", None) and rt.device == "cpu":   # say it before the first step stalls
            click.echo(f"note: torch.compile ({rt.compile}) on the CPU compiles before the first step: expect minutes "
                       "before it samples (README: GPU runtimes)", err=True)
        times = SampleTimes()
        started = None
        if cache is not None:
            from vdit_deploy.step_cache import policy_for
            started = policy_for(rt, **cache).start(len(plan))
        videos = sample(rt, contract, cond, plan, guidance, seed, progress=True, times=times, cache=started)
        what = rt.describe()
        if started is not None:
            what += f"; {started.policy.mode}: {started.full_steps} of {len(plan)} steps in full"
        if decoder is not None:
            videos = decoder.decode(videos)
            what += f", decoded by the VAE ({decoder.describe()})"
            decoder.close()
        return videos, times, what



@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help=f"Default: {SHIPPED_HELP}.")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), default=None,
              help="Export directory or .onnx file (for --runtime ort, trt, ort-trt).")
@click.option("--label", "labels", multiple=True,
              help="Class label(s) of a class-conditioned model; repeat or comma-separate for several videos "
                   "[default: 0].")
@click.option("--cond", "cond_file", type=click.Path(path_type=Path), default=None,
              help="Conditioning tensors (.safetensors, one per input the model takes, batch first: one row per "
                   "video), e.g. precomputed T5 embeddings; `vdit info EXPORT` lists the inputs.")
@sampling_options
@click.option("--device", default=None, help="--runtime torch: cpu, cuda or cuda:N (default: cuda where there is one).")
@click.option("--compile", "compile_mode", type=click.Choice(COMPILE_MODES),
              default=None, help="--runtime torch: torch.compile the sampler step (reduce-overhead: CUDA graphs).")
@click.option("--null", "null_file", type=click.Path(path_type=Path), default=None,
              help="--runtime torch on a diffusers model: the null conditioning (.safetensors, batch 1), as given "
                   "to `vdit export --null` (an export carries its own). Default: zeros.")
@click.option("--tile", default=None, type=click.IntRange(8), help="A latent model's .gif/.mp4: decode in spatial tiles "
              "of this many output pixels, blended as diffusers' tiled_decode (default: untiled).")
@threads_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output .gif, .mp4 or .npy.")
def sample(checkpoint, onnx_path, labels, cond_file, sampler, steps, order, spacing, eta, guidance, seed, runtime,
           precision, cache_mode, cache_threshold, cache_warmup, cache_max_skips, device, compile_mode, null_file,
           tile, threads, out):
    """Sample videos (DPM-Solver++, UniPC, DDIM, DDPM; flow euler on flow models) from a model directory (vdit checkpoint or
    diffusers save_pretrained) or an ONNX export. A .npy output holds the latents; a .gif/.mp4 shows
    them: a latent-space model's through the export's decoder.onnx (`vdit export-decoder`), or with
    --runtime torch the pipeline's ../vae."""
    from vdit_deploy.runtimes.base import check_runtime_name
    from vdit_deploy.video import check_suffix, write_video

    check_output(check_suffix(out))
    options = {}
    if check_runtime_name(runtime) == "torch":
        from vdit_deploy.checkpoint import SHIPPED
        artifact = checkpoint or SHIPPED
        options = {"device": device, "compile": compile_mode}
        if null_file is not None:
            from vdit_deploy.sources import load_source
            options["source"] = load_source(artifact, device or "cpu", null_file=null_file)
    else:
        if onnx_path is None:
            raise VditError(f"--runtime {runtime} samples from an export: pass --onnx DIR (see `vdit export`)")
        if device or compile_mode or null_file:
            raise VditError("--device, --compile and --null are for --runtime torch (ONNX Runtime picks its provider; "
                            "TensorRT runs on the GPU its engine was built for; an export carries its null "
                            "conditioning)")
        artifact = onnx_path
    cache = None
    if cache_mode != "off":
        cache = dict(mode=cache_mode, threshold=cache_threshold, warmup=cache_warmup, max_skips=cache_max_skips)
    videos, times, desc = run_sampler(runtime, artifact, precision, parse_labels(labels), sampler, steps,
                                      eta, guidance, seed, options, order=order, spacing=spacing, cond_file=cond_file,
                                      out=out, cache=cache, tile=tile)
    write_video(out, videos, scale=1 if videos.shape[-1] >= 64 else 4)   # small videos upscaled to be seen
    click.echo(f"wrote {out}: {len(videos)} video(s), {len(times.steps)} {sampler or 'default-sampler'} steps in "
               f"{times.total:.2f} s ({desc}, {threads} CPU thread(s))")


@main.command()
@click.option("--out", default="demo.gif", show_default=True, type=click.Path(path_type=Path))
@click.option("--seeds", default=2, show_default=True, type=click.IntRange(1, 8), help="Rows of the grid.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--guidance", default=2.0, show_default=True, type=GUIDANCE)
@threads_option
def demo(out, seeds, steps, guidance, threads):
    """Sample every class of the shipped checkpoint (DDIM) into one GIF grid."""
    from vdit_deploy.checkpoint import SHIPPED, read_info
    from vdit_deploy.data import CLASS_NAMES
    from vdit_deploy.video import check_suffix, write_video

    check_output(check_suffix(out))
    cfg = read_info(SHIPPED).model
    labels = [c for _ in range(seeds) for c in range(cfg.num_classes)]
    videos, times, desc = run_sampler("torch", SHIPPED, "fp32", labels, "ddim", steps, 0.0, guidance, seed=0)
    write_video(out, videos, columns=cfg.num_classes)
    click.echo(f"wrote {out}: columns {', '.join(CLASS_NAMES[:cfg.num_classes])}; {seeds} seed(s) each; "
               f"{steps} DDIM steps, guidance {guidance}, {times.total:.2f} s ({desc}, {threads} CPU thread(s))")
