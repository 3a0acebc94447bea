"""The sampling loop: any sampler plan (DDPM-family or flow matching) over any denoiser, with all noise drawn on the host.

Noise comes from one seeded numpy Generator (x_T first, then each stochastic step's z in order),
so every runtime, PyTorch, ONNX Runtime or TensorRT, sees bit-identical noise for the same seed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vdit_deploy.config import check_memory
from vdit_deploy.contract import Contract, read_cond
from vdit_deploy.samplers import DEFAULT_SAMPLER, SolverState, Step, guided_step, make_steps
from vdit_deploy.errors import VditError
from vdit_deploy.progress import bar


@dataclass
class SampleTimes:
    """Wall time of a sample split into the denoiser/runtime steps and the host loop around them."""
    total: float = 0.0
    steps: list[float] = field(default_factory=list)

    @property
    def overhead(self) -> float:
        return self.total - sum(self.steps)


class DenoiseRecorder:
    """A plain `denoise(x_t, t, cond)` for `sample()` that keeps what the sampler asked for: each call's
    index, inputs and output (only the indices in `keep`, when given) and each call's seconds.
    Calibration records the inputs it will quantize for; compare records the reference trajectory."""

    def __init__(self, denoise, keep=None):
        self.denoise, self.keep = denoise, keep
        self.calls: list[tuple] = []        # (index, x_t, t, cond, out)
        self.seconds: list[float] = []
        self.index = 0

    def __call__(self, x_t, t, cond):
        start = time.perf_counter()
        out = self.denoise(x_t, t, cond)
        self.seconds.append(time.perf_counter() - start)
        if self.keep is None or self.index in self.keep:
            self.calls.append((self.index, x_t, t, cond, out))
        self.index += 1
        return out


def default_sampler(contract: Contract) -> str:
    """The sampler a model is sampled and served with when none is named: its pipeline's (from its
    scheduler config; a flow model's own), else the project's default (its steps: DEFAULT_STEPS)."""
    return sampler_name(contract)


def sampler_plan(contract: Contract, sampler: str | None = None, steps: int | None = None, eta: float = 0.0,
                 order: int | None = None, spacing: str | None = None):
    """The sampler's steps for this model: its prediction type, its schedule's x0 clipping, timestep
    spacing and lambda_min, and DDPM's learned variance for eps+var. sampler / steps None: the
    schedule's pipeline defaults (from its scheduler config), else the project's."""
    schedule = contract.schedule
    sampler = sampler_name(contract, sampler)
    # "linspace" is also the CLI's --spacing default (until the sample stage's option defaults to none):
    # read as not given, so the scheduler config's spacing (CogVideoX's trailing) and a flow model's sigmas hold
    given = None if spacing == "linspace" else spacing
    if schedule.kind == "flow":
        return make_steps(schedule, sampler, steps, eta, order=order, spacing=given, prediction="flow")
    if sampler == schedule.sampler:
        steps = schedule.steps if steps is None else steps
        order = schedule.order if order is None else order
    spacing = given
    if given is None and sampler in ("ddim", "dpm++", "unipc", "cogvideox-dpm"):
        spacing = schedule.spacing
    return make_steps(schedule, sampler, steps, eta, clip=schedule.clip, order=order, spacing=spacing,
                      prediction=contract.prediction, lambda_min=schedule.lambda_min,
                      learned_variance=contract.output == "eps+var" and sampler == "ddpm")


def sampler_name(contract: Contract, sampler: str | None = None) -> str:
    """The sampler a model samples with: the one asked for, or its pipeline's, or the project's default."""
    return sampler or contract.schedule.sampler or DEFAULT_SAMPLER


def describe_sampling(contract: Contract) -> str:
    """`vdit info`'s lines on how a model is sampled: its objective and schedule, the default sampler."""
    schedule = contract.schedule
    sampler = sampler_name(contract)
    try:
        plan = sampler_plan(contract)
        steps = f"{len(plan)} steps, t fed {plan[0].t:g} .. {plan[-1].t:g}"
    except VditError as e:
        steps = f"not runnable: {e}"
    whose = "its scheduler config's (its pipeline's)" if schedule.sampler else "the project's default"
    order = f" order {schedule.order}," if sampler in ("unipc", "dpm++") and getattr(schedule, "order", None) else ""
    return (f"objective   {schedule.describe()}; output {contract.output}\n"
            f"sampler     {sampler},{order} {steps} ({whose})")


def conditioning(contract: Contract, labels=None, cond=None) -> dict:
    """The conditioning to serve, one row per video: `cond` (a dict of arrays, or a .safetensors file:
    contract.read_cond), or class labels for a class model (default: every class once)."""
    if cond is not None:
        if labels is not None:
            raise VditError("give class labels or a conditioning file, not both")
        return read_cond(cond, contract) if isinstance(cond, (str, Path)) else contract.check_cond(cond)
    spec = contract.label_input()
    if spec is None:
        raise VditError(f"this model is conditioned on {contract.describe_cond()}, not on class labels: "
                        "pass --cond FILE.safetensors")
    return contract.labels(range(spec.classes) if labels is None else labels)


def as_cond(contract: Contract, cond) -> dict:
    """Conditioning for `sample`: a dict of named arrays (checked against the contract), or class
    labels for a class-conditioned model."""
    return contract.check_cond(cond) if isinstance(cond, dict) else contract.labels(cond)


def sampling_bytes(contract: Contract, videos: int) -> int:
    """Host memory the loop holds for `videos` videos: x_t, the noise, zeros and the solver's two states
    (the denoiser's own memory is the runtime's)."""
    return 4 * 8 * videos * math.prod(contract.latent)


def sample(denoiser, contract: Contract, cond, steps: list[Step], guidance: float = 1.0, seed: int = 0,
           progress: bool = False, times: SampleTimes | None = None, null: dict | None = None,
           cache=None) -> np.ndarray:
    """Sample videos (B, C, F, H, W) in float32, one per row of the conditioning.

    `denoiser` is a runtime (anything with the fused `step(x_t, t, cond, guidance, coefs, noise, state)`,
    which brings its own null conditioning) or a plain callable `denoise(x_t, t, cond) -> out` on numpy
    arrays (t float32 (B,)); guidance then needs `null` (batch 1, as null_cond.safetensors holds it).
    `cond`: name -> array with the batch first, or class labels (contract.labels).
    A multistep plan (dpm++, unipc) carries one SolverState through its steps (on the runtime's device).
    cache: a step_cache.StepCache started for len(steps) (policy.start): the runtime's cached_step runs
    each step and the cache records its decisions."""
    from vdit_deploy import validate

    validate.guidance(guidance)
    cond = as_cond(contract, cond)
    b = contract.batch_of(cond)
    check_memory(sampling_bytes(contract, b), f"sampling {b} videos")     # before x_T is drawn
    step_fn = getattr(denoiser, "step", None)
    if step_fn is None:
        null_b = None if null is None else contract.null_batch(null, cond)

        def step_fn(x, t, cond, g, coefs, noise, state):
            return guided_step(denoiser, x, t, cond, null_b, g, coefs, noise, state)
    if cache is not None:
        if getattr(denoiser, "cached_step", None) is None:
            raise VditError("step caching needs a runtime (its split graphs), not a plain denoise function")
        if cache.steps != len(steps) or cache.index:
            raise VditError(f"the step cache was started for {cache.steps} steps (at {cache.index}), the plan has "
                            f"{len(steps)}: start a new one per sample (policy.start(len(steps)))")

        def step_fn(x, t, cond, g, coefs, noise, state):
            return denoiser.cached_step(x, t, cond, g, coefs, noise, state, cache)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    x = rng.standard_normal((b, *contract.latent), dtype=np.float32)               # x_T ~ N(0, I)
    zeros = np.zeros_like(x)
    state = SolverState() if any(s.multistep for s in steps) else None
    for step in bar(steps, show=progress, desc="sample", unit="step"):
        noise = rng.standard_normal(x.shape, dtype=np.float32) if step.stochastic else zeros
        t0 = time.perf_counter()
        x = step_fn(x, step.t, cond, guidance, step.coefs, noise, state)
        if times is not None:
            times.steps.append(time.perf_counter() - t0)
    x = np.asarray(x, dtype=np.float32)   # a runtime may hand back a device-synchronised view
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:   # say so rather than hand back (and write) a black video
        raise VditError(f"the sampled videos hold NaN or inf in {bad} of {x.size} values: the model, its weights "
                        "or the graph give non-finite output")
    if times is not None:
        times.total = time.perf_counter() - start
    return x
