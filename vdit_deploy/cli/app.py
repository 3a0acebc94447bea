"""`vdit`: the command line's group, its error handling and the option types every stage shares.
Each stage's commands live in their own module of this package (model, export, calibrate, build,
sample, compare, serve); each command parses, makes one library call and prints.

Exit codes: 0 success; 1 a user error, also a usage error (bad option value, unknown command), printed
as one `Error: ...` line on stderr; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM). Interrupted or
terminated runs remove their temporaries; no output file is ever left half-written. Anything else, with
a traceback, is a bug.
"""
from __future__ import annotations

import signal
import sys

import click

from vdit_deploy.errors import VditError

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
                "solvers; ddim (50 steps by default); ddpm (all T steps); cogvideox-dpm (CogVideoX's SDE "
                "DPM-Solver++). A flow-matching model: euler, unipc or dpm++ on its sigmas.")
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
    """A float that is finite and in range: nan and inf parse as floats, and would sample NaN videos;
    and within what float32 holds (the graphs compute in it: 1e308 would be inf there)."""
    name = "number"

    def __init__(self, lo: float | None = None, lo_open: bool = False, hi: float | None = None):
        from vdit_deploy.validate import FLOAT32_MAX

        self.lo, self.lo_open, self.hi = lo, lo_open, FLOAT32_MAX if hi is None else hi

    def convert(self, value, param, ctx):
        from vdit_deploy import validate

        try:
            return validate.number(float(value), "the value", self.lo, self.hi, lo_open=self.lo_open)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        except VditError as e:
            self.fail(str(e), param, ctx)


GUIDANCE = Finite(0, hi=100.0)   # validate.GUIDANCE_MAX: classifier-free guidance in use is 1..20


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


COND_ROWS_HELP = ("Conditioning rows (.safetensors, one tensor per input the model takes, batch first), e.g. "
                  "precomputed T5 embeddings: needed for a model that is not class-conditioned.")


def parse_batch_range(text: str, option: str = "--batch") -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise VditError(f"{option} takes MIN:MAX (e.g. 1:8), got {text!r}") from None
    from vdit_deploy.validate import INT32_MAX

    if option != "--batch" and not 1 <= lo <= hi:
        raise VditError(f"{option} takes 1 <= MIN <= MAX, got {text!r}")
    if hi > INT32_MAX:   # a graph's axis is an int32 in TensorRT and the metadata
        raise VditError(f"{option} takes MAX <= {INT32_MAX}, got {text!r}")
    return lo, hi


def parse_ints(text: str, option: str, count: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    from vdit_deploy.validate import INT32_MAX

    if len(values) != count or min(values) < 1 or max(values) > INT32_MAX:
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


THREADS_HELP = ("CPU threads for torch and ONNX Runtime alike (default: the cores not already busy, i.e. cores minus "
                "the 1-minute load average, at least 1).")


def _configure_threads(ctx, param, value):
    """At parse time, before the command runs: torch and every ONNX Runtime session take this count."""
    from vdit_deploy.progress import note
    from vdit_deploy.threads import configure

    count, warning = configure(value)
    if warning:
        note(warning)          # on a terminal: a refusal stays one `Error:` line in logs and pipes
    return count


def threads_option(f):
    """--threads for a compute command; the command gets the count it runs with as `threads`."""
    return click.option("--threads", type=click.IntRange(1), default=None, callback=_configure_threads,
                        help=THREADS_HELP)(f)


def human_size(n: int) -> str:
    """Bytes as people read them: 812 B, 3.4 kB, 7.0 MB, 1.2 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
