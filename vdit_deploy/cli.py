"""`vdit`: the command line.

Exit codes: 0 success; 1 a user error, also a usage error (bad option value, unknown command), printed
as one `Error: ...` line on stderr; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM). Interrupted or
terminated runs remove their temporaries; no output file is ever left half-written. Anything else, with
a traceback, is a bug.
"""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import click

from vdit_deploy.samplers import DEFAULT_SAMPLER
from vdit_deploy.errors import VditError
from vdit_deploy.export.variants import ENGINE_PRECISIONS, precisions_help
from vdit_deploy.files import check_output
from vdit_deploy.runtimes.base import COMPILE_MODES

SHIPPED_HELP = "the shipped tiny demo checkpoint"
SEED = click.IntRange(0, 2 ** 32 - 1)


def fail(message: str, code: int = 1):
    click.echo("Error: " + " ".join(str(message).split()), err=True)   # always one line
    sys.exit(code)


def _terminate(signum, frame):
    # An exception, not an exit from C: atomic writes and temporary directories clean up on the way out.
    click.echo("Terminated.", err=True)
    raise SystemExit(128 + signum)


SAMPLER_HELP = ("unipc (UniPC-bh2, 15 steps by default) or dpm++ (DPM-Solver++ 2M, 20 steps): multistep ODE "
                "solvers; ddim (50 steps by default); ddpm (all T steps).")
STEPS_HELP = "Denoiser calls, 1..T (default: the sampler's; ddpm always runs all T)."


class Cli(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            previous = signal.signal(signal.SIGTERM, _terminate)
        except ValueError:    # not the main thread (an embedding application): leave its handlers alone
            previous = None
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:   # bare `vdit` / `vdit calibrate`: the help itself
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.ClickException as e:    # usage errors: one line and exit 1, like every user error
            where = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
            fail(e.format_message() + where)
        except click.Abort:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VditError as e:
            fail(str(e))
        except OSError as e:          # the file system said no: disk full, permissions, a vanished file
            fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
        except MemoryError:
            fail("out of memory; use a smaller model, batch or video")
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)


class Finite(click.ParamType):
    """A float that is finite and in range: nan and inf parse as floats, and would sample NaN videos."""
    name = "number"

    def __init__(self, lo: float | None = None, lo_open: bool = False):
        self.lo, self.lo_open = lo, lo_open

    def convert(self, value, param, ctx):
        from vdit_deploy import validate

        try:
            return validate.number(float(value), "the value", self.lo, lo_open=self.lo_open)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        except VditError as e:
            self.fail(str(e), param, ctx)


@click.group(cls=Cli)
@click.version_option(package_name="vdit-deploy")
def main():
    """vdit-deploy: a video diffusion transformer from checkpoint to a fast, verified sampler.

    Exit codes: 0 success, 1 user or usage error (one `Error:` line), 130 interrupted, 143 terminated."""


def parse_labels(labels: tuple[str, ...]) -> list[int]:
    from vdit_deploy.validate import INT32_MAX

    try:
        out = [int(v) for item in labels for v in item.split(",")]
    except ValueError:
        raise VditError(f"--label takes integers, got {' '.join(labels)}") from None
    bad = [v for v in out if not 0 <= v <= INT32_MAX]
    if bad:
        raise VditError(f"label {bad[0]} is out of range: labels are class indices 0, 1, 2, ...")
    return out


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
        from vdit_deploy.export.metadata import describe_onnx
        click.echo(describe_onnx(path))
        return
    from vdit_deploy.sources import describe_diffusers_dir, is_diffusers_dir

    if is_diffusers_dir(path):
        click.echo(describe_diffusers_dir(path))
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
@click.option("--lr", default=8e-4, show_default=True, type=Finite(0, lo_open=True))
@click.option("--schedule", type=click.Choice(["linear", "cosine"]), default="cosine", show_default=True,
              help="Cosine keeps more of T informative at these small frame sizes (Nichol & Dhariwal).")
@click.option("--attention", type=click.Choice(["factorized", "factorized_dot_product", "joint"]),
              default=None, help="Override the preset's attention mode.")
@click.option("--checkpoint-every", default=250, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Run directory; it is a checkpoint (EMA weights) and resumes if it exists.")
def train(preset_name, steps, batch_size, lr, schedule, attention, checkpoint_every, seed, out):
    """Train on the generated Moving Shapes videos (resumable)."""
    from vdit_deploy.config import preset
    from vdit_deploy.schedules import Schedule
    from vdit_deploy.train import TrainConfig, moving_shapes_config, train as run_training

    cfg, note = moving_shapes_config(preset(preset_name, **({"attention": attention} if attention else {})))
    if note:
        click.echo(f"note: {note}")
    result = run_training(cfg, out, TrainConfig(steps=steps, batch_size=batch_size, lr=lr,
                                                checkpoint_every=checkpoint_every, seed=seed),
                          Schedule(schedule))
    click.echo(f"trained to step {result['steps']} in {result['seconds'] / 60:.1f} min, "
               f"final loss {result['final_loss']:.4f}; checkpoint: {out}")


# ---- sample / demo ------------------------------------------------------------------------------
def sampling_options(f):
    for option in reversed([
        click.option("--sampler", default=DEFAULT_SAMPLER, show_default=True, help=SAMPLER_HELP),
        click.option("--steps", default=None, type=int, help=STEPS_HELP),
        click.option("--order", default=None, type=int, help="dpm++ / unipc order: 1 or 2 (default 2)."),
        click.option("--spacing", default="linspace", show_default=True,
                     help="dpm++ / unipc timestep spacing: linspace, leading or trailing (as in diffusers)."),
        click.option("--eta", default=0.0, show_default=True, type=Finite(0), help="DDIM noise (0: deterministic)."),
        click.option("--guidance", default=2.0, show_default=True, type=Finite(0),
                     help="Classifier-free guidance scale (1: off)."),
        click.option("--seed", default=0, show_default=True, type=SEED),
        click.option("--runtime", default="torch", show_default=True,
                     help="torch (checkpoint), or ort / trt / ort-trt (ONNX export, no torch needed; "
                          "trt loads the engines `vdit build` made)."),
        click.option("--precision", default="fp32", show_default=True, help=precisions_help()),
    ]):
        f = option(f)
    return f


def run_sampler(runtime_name, artifact, precision, labels, sampler, steps, eta, guidance, seed, options=None,
                order=None, spacing="linspace", cond_file=None, out=None):
    """Open the runtime, turn --label or --cond into the model's conditioning, check `out` can show it,
    sample."""
    import math

    from vdit_deploy.config import check_memory
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import SampleTimes, conditioning, sample, sampler_plan

    with open_runtime(runtime_name, artifact, precision=precision, **(options or {})) as rt:
        contract = rt.contract
        if out is not None:
            from vdit_deploy.video import check_drawable
            check_drawable(out, contract.latent[0])
        default = None if cond_file else [0]         # one video of class 0 unless --cond gives the rows
        cond = conditioning(contract, labels or default, cond_file)   # a text model refuses labels here
        if guidance != 1.0:    # before the first step: a null conditioning of another length is refused
            contract.null_batch(rt.null, cond)
        b = contract.batch_of(cond)
        check_memory(4 * 8 * b * math.prod(contract.latent), f"sampling {b} videos")   # video, noise, state
        plan = sampler_plan(contract, sampler, steps, eta, order, spacing)
        times = SampleTimes()
        videos = sample(rt, contract, cond, plan, guidance, seed, progress=True, times=times)
        return videos, times, rt.describe()



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
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output .gif, .mp4 or .npy.")
def sample(checkpoint, onnx_path, labels, cond_file, sampler, steps, order, spacing, eta, guidance, seed, runtime,
           precision, device, compile_mode, null_file, out):
    """Sample videos (DPM-Solver++, UniPC, DDIM or DDPM) from a model directory (vdit checkpoint or
    diffusers save_pretrained) or an ONNX export. A .npy output holds the latents; a .gif/.mp4 shows
    them (a latent-space model's video needs its VAE decoder, which is not bundled)."""
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
    videos, times, desc = run_sampler(runtime, artifact, precision, parse_labels(labels), sampler, steps,
                                      eta, guidance, seed, options, order=order, spacing=spacing, cond_file=cond_file,
                                      out=out)
    write_video(out, videos)
    click.echo(f"wrote {out}: {len(videos)} video(s), {len(times.steps)} {sampler} steps in {times.total:.2f} s ({desc})")


@main.command()
@click.option("--out", default="demo.gif", show_default=True, type=click.Path(path_type=Path))
@click.option("--seeds", default=2, show_default=True, type=click.IntRange(1, 8), help="Rows of the grid.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--guidance", default=2.0, show_default=True, type=Finite(0))
def demo(out, seeds, steps, guidance):
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
               f"{steps} DDIM steps, guidance {guidance}, {times.total:.2f} s ({desc})")


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
    click.echo(f"{what}")
    click.echo(result.table())
    result.check()


# ---- build (TensorRT) ---------------------------------------------------------------------------
@main.command()
@click.argument("onnx_dir", type=click.Path(path_type=Path))
@click.option("--precision", type=click.Choice(ENGINE_PRECISIONS), default=None,
              help="Default: the target's, else fp16. int8 builds the Q/DQ graph from `vdit calibrate`.")
@click.option("--batch", default=None, help="Engine batch range MIN:OPT:MAX (default 1:2:8, or the target's).")
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
    profile over the batch and the model contract's named axes)."""
    from vdit_deploy.runtimes.trt_build import build_export

    for b in build_export(onnx_dir, precision, batch, fixed_batch, target, workspace, opt_level, cache_dir,
                          build=not no_build, seq=seq, log=click.echo):
        how = f"built in {b.engine.manifest.get('build_seconds', 0):.1f} s" if b.built else "cached, up to date"
        click.echo(f"{b.kind:<9} {b.engine.path}  ({b.engine.path.stat().st_size / 1e6:.1f} MB, {b.precision}, "
                   f"batch {b.profile}, {how})")


# ---- export / verify (ONNX) ---------------------------------------------------------------------
def parse_batch_range(text: str, option: str = "--batch") -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise VditError(f"{option} takes MIN:MAX (e.g. 1:8), got {text!r}") from None
    if option != "--batch" and not 1 <= lo <= hi:
        raise VditError(f"{option} takes 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def parse_ints(text: str, option: str, count: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count or min(values) < 1:
        raise VditError(f"{option} takes {count} positive integers separated by commas, got {text!r}")
    return values


def needs_torch(what: str):
    """Export and verify run the PyTorch model: without torch, say so in one line."""
    import importlib.util

    try:
        if importlib.util.find_spec("torch") is not None:
            import torch  # noqa: F401
            return
    except ImportError:
        pass
    raise VditError(f"vdit {what} needs torch: pip install 'vdit-deploy[torch]' (sampling an export does not)")


def print_verify(export_dir, checkpoint, tolerance):
    needs_torch("verify")
    from vdit_deploy.export.verify import check, verify

    report = verify(export_dir, checkpoint=checkpoint, tolerance=tolerance)
    click.echo(report.table())
    check(report, export_dir)


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
@click.option("--opset", default=18, show_default=True, type=click.IntRange(17))
@click.option("--verify/--no-verify", default=True, show_default=True, help="Compare with PyTorch after export.")
@click.option("--tolerance", default=1e-4, show_default=True, type=Finite(0, lo_open=True),
              help="fp32 error allowed by --verify (relative L2, see `vdit verify --help`).")
def export(checkpoint, out, class_name, inputs, latent, output_kind, scheduler_config, null_file, seq, batch,
           fixed_batch, opset, verify, tolerance):
    """Export a model directory (a vdit checkpoint, or a diffusers save_pretrained directory with
    safetensors weights) to denoiser.onnx, the fused step.onnx and null_cond.safetensors, with the model
    contract in their metadata, and verify them."""
    needs_torch("export")
    from vdit_deploy.export.metadata import check_export_out
    from vdit_deploy.export.onnx_export import export_checkpoint

    check_export_out(out)
    batch_range = parse_batch_range(batch)
    options = dict(class_name=class_name, inputs=inputs, output=output_kind, scheduler_config=scheduler_config,
                   null_file=null_file, seq=parse_batch_range(seq, "--seq") if seq else None,
                   latent=parse_ints(latent, "--latent", 4) if latent else None)
    start = time.perf_counter()
    export_checkpoint(checkpoint, out, batch=batch_range, fixed=fixed_batch, opset=opset, **options)
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in sorted(out.iterdir()))
    click.echo(f"exported {out}: {sizes} in {time.perf_counter() - start:.1f} s")
    if verify:
        print_verify(out, checkpoint, tolerance)


@main.command("verify")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="The source checkpoint (default: the path recorded at export).")
@click.option("--tolerance", default=1e-4, show_default=True, type=Finite(0, lo_open=True),
              help="Error allowed for the fp32 graphs; fp16/int8 variants have their own (export/verify.py).")
def verify_cmd(export_dir, checkpoint, tolerance):
    """Compare every graph of an export (fp32 and each fp16/int8 variant) with PyTorch on a real sampling
    trajectory; exit 1 above tolerance or when nothing could be checked. Error is relative L2 against the
    output's scale: ||eps|| for a denoiser, the sum of the update's term magnitudes for a step."""
    print_verify(export_dir, checkpoint, tolerance)


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


COND_ROWS_HELP = ("Conditioning rows (.safetensors, one tensor per input the model takes, batch first), e.g. "
                  "precomputed T5 embeddings: needed for a model that is not class-conditioned.")


# ---- compare (every runtime side by side) -------------------------------------------------------
@main.command()
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option("--runtimes", default="torch:fp32,ort:fp32,ort:fp16,ort:int8,trt:fp16,trt:int8", show_default=True,
              help="RUNTIME:PRECISION list; those that cannot run here are listed as skipped, with the reason.")
@click.option("--steps", default=None, type=click.IntRange(1), help=STEPS_HELP)
@click.option("--sampler", default=DEFAULT_SAMPLER, show_default=True,
              help=f"{SAMPLER_HELP} The calibration set for INT8 follows it.")
@click.option("--guidance", default=2.0, show_default=True, type=Finite(0))
@click.option("--batch", "batches", default="1,4", show_default=True, help="Batch sizes (videos per sample).")
@click.option("--seeds", default="0-1", show_default=True, help="Seeds, e.g. 0-3 or 0,5.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1), help="Timed samples after 1 warm-up.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for every runtime (torch and ONNX Runtime), for a fair CPU comparison.")
@click.option("--min-psnr", default=30.0, show_default=True, type=Finite(), help="Rows under this PSNR (dB) turn red.")
@click.option("--cond", "cond_file", type=click.Path(path_type=Path), default=None,
              help=COND_ROWS_HELP + " Video i of seed s takes row (s + i) % rows.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Report directory: report.json, report.md, plots, samples.gif, cached artifacts/.")
def compare(source, runtimes, steps, sampler, guidance, batches, seeds, repeats, threads, min_psnr, cond_file, out):
    """Latency and accuracy of every runtime and precision, side by side (SOURCE: model directory or
    export directory; default: the shipped checkpoint). Every runtime samples with the same noise and
    conditioning: class labels, or the rows of --cond for a text-conditioned model."""
    import shlex

    from vdit_deploy.checkpoint import SHIPPED
    from vdit_deploy.compare import compare as run_compare, format_table, parse_ints

    check_output(out / "report.json")

    report = run_compare(source or SHIPPED, out, runtimes, steps=steps, batches=parse_ints(batches, "--batch"),
                         seeds=parse_ints(seeds, "--seeds"), sampler=sampler, guidance=guidance, repeats=repeats,
                         threads=threads, min_psnr=min_psnr, log=lambda m: click.echo(m, err=True),
                         command=shlex.join(["vdit", *sys.argv[1:]]), cond=cond_file)
    click.echo(format_table(report, color=True))
    for note in report["notes"]:
        click.echo(f"note: {note}")
    click.echo(f"reference {report['reference']}; wrote {out / 'report.json'}, {out / 'report.md'}"
               + "".join(f", {out / f}" for k, f in report["files"].items() if f and k not in ("json", "markdown")))


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
@click.option("--sampler", default=DEFAULT_SAMPLER, show_default=True,
              help=f"The sampler you deploy (its timesteps are the ones INT8 ranges must cover): {SAMPLER_HELP}")
@click.option("--steps", default=None, type=click.IntRange(1), help=STEPS_HELP)
@click.option("--guidance", default=2.0, show_default=True, type=Finite(0))
@click.option("--eta", default=0.0, show_default=True, type=Finite(0))
@click.option("--seeds", default=4, show_default=True, type=click.IntRange(1, 10 ** 6), help="Seeds 0..N-1.")
@click.option("--label", "labels", multiple=True, help="Labels per sample, class models (default: every class).")
@click.option("--cond", "cond_file", type=click.Path(path_type=Path), default=None,
              help=COND_ROWS_HELP + " One row per video of each sample.")
@click.option("--timesteps", default=8, show_default=True, type=click.IntRange(1),
              help="Steps recorded per trajectory, spread from t=T-1 to 0.")
def calibrate_collect(source, out, sampler, steps, guidance, eta, seeds, labels, cond_file, timesteps):
    """Record denoiser inputs (x_t, t and every conditioning input, null rows included) from the fp32
    sampler (SOURCE: model directory or export directory)."""
    import json

    from vdit_deploy.calibration.collect import collect

    path = collect(source, out, sampler, steps, guidance, eta, range(seeds), parse_labels(labels) if labels else None,
                   timesteps, progress=True, cond=cond_file)
    m = json.loads((path / "manifest.json").read_text())
    click.echo(f"wrote {path}: {m['shapes']['x_t'][0]} rows, t = {', '.join(map(str, m['timesteps']))} "
               f"({m['sampler']} {m['steps']} steps, guidance {m['guidance']}, seeds {m['seeds']})")


@calibrate.command("fp16")
@click.argument("export_dir", type=click.Path(path_type=Path))
@calib_option(required=False)
def calibrate_fp16(export_dir, calib_dir):
    """Write denoiser.fp16.onnx and step.fp16.onnx (norms, softmax, pow, exp, the timestep embedding
    and the step's update stay fp32)."""
    from vdit_deploy.calibration.fp16 import check_fp16, convert_fp16

    path = convert_fp16(export_dir, calib_dir)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if calib_dir is not None:
        r = check_fp16(export_dir, calib_dir)
        click.echo(f"checked on {r['rows']} calibration rows: no inf/NaN, eps rel L2 {r['eps_rel_l2']:.2e}")


@calibrate.command("int8")
@click.argument("export_dir", type=click.Path(path_type=Path))
@calib_option(required=False)
@click.option("--mode", type=click.Choice(["dynamic", "qdq"]), default="dynamic", show_default=True,
              help="dynamic: fastest on CPU (denoiser.int8-dynamic.onnx); qdq: static Q/DQ for TensorRT "
              "(denoiser.int8-qdq.onnx and step.int8-qdq.onnx).")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy"]), default=None,
              help="Activation range calibration for qdq (default: the measured best).")
@click.option("--keep-fp", multiple=True, help="Layer pattern (regex on e.g. 'blocks.0.mlp.0/linear') kept in float; "
              "replaces the default sensitive set. 'none' quantizes everything.")
def calibrate_int8(export_dir, calib_dir, mode, method, keep_fp):
    """Write an INT8 denoiser graph; sensitive layers stay float."""
    from vdit_deploy.calibration.int8 import DEFAULT_METHOD, DEFAULT_SENSITIVE, calibration_error, quantize_int8

    keep = DEFAULT_SENSITIVE if not keep_fp else (() if keep_fp == ("none",) else keep_fp)
    path = quantize_int8(export_dir, calib_dir, mode=mode, method=method or DEFAULT_METHOD, keep_fp=keep)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); kept in float: {', '.join(keep) or 'nothing'}")
    if calib_dir is not None:
        click.echo(f"eps rel L2 vs fp32 on the calibration set: {calibration_error(path, export_dir, calib_dir):.3e}")


@calibrate.command("sensitivity")
@click.argument("export_dir", type=click.Path(path_type=Path))
@calib_option()
@click.option("--mode", type=click.Choice(["dynamic", "qdq"]), default="dynamic", show_default=True)
@click.option("--layers", default=None, help="Regex: only the layer groups it finds (e.g. 'blocks.0').")
def calibrate_sensitivity(export_dir, calib_dir, mode, layers):
    """Quantize one layer at a time and print the eps error each adds, largest first."""
    from vdit_deploy.calibration.sensitivity import sensitivity, table

    click.echo(table(sensitivity(export_dir, calib_dir, mode=mode, layers=layers)))


@calibrate.command("report")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--precisions", default="fp16,int8", show_default=True, help="Comma-separated ONNX Runtime precisions (int8: the int8-dynamic graph; int8-qdq).")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1))
@click.option("--seeds", default=2, show_default=True, type=click.IntRange(1))
@click.option("--guidance", default=2.0, show_default=True, type=Finite(0))
@click.option("--cond", "cond_file", type=click.Path(path_type=Path), default=None,
              help=COND_ROWS_HELP + " One row per video.")
@click.option("--out", default="calibration-report", show_default=True, type=click.Path(path_type=Path))
def calibrate_report(export_dir, precisions, steps, seeds, guidance, cond_file, out):
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


if __name__ == "__main__":
    main()
