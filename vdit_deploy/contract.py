"""The model contract: what a denoiser takes and gives, stored in every export and used by every stage.

    denoiser(x_t (B, C, F, H, W) float32, t (B,) float32, **cond) -> out (B, k*C, F, H, W) float32

A contract names
  latent     (C, F, H, W) of x_t
  output     what `out` is: eps; eps+var (eps, then a learned variance in [-1, 1]: 2C channels); v; x0;
             flow (the velocity v = noise - x0 of flow matching, x_t = (1 - sigma) x0 + sigma noise, fed
             t = sigma * T as a float; a FlowSchedule with invert (Mochi): fed (1 - sigma) T, gives x0 - noise)
  cond       the conditioning inputs beyond x_t and t, in the denoiser's argument order: name, dtype and
             shape, whose first axis is "batch" and whose other named axes (e.g. "seq" for text tokens)
             may vary within `axes` (min, max). A class label is int32 (batch,) with `classes` values;
             text embeddings float32 (batch, seq, D); an attention mask (batch, seq)
  schedule   the noise schedule it was trained with (schedules.Schedule: DDPM betas; flow.FlowSchedule:
             flow matching's sigmas, shift, dynamic shift...) and its pipeline's default sampler
             Each input has a role: "cond" (guidance pairs it with the null conditioning), "mask" (0/1
             values: verify and the null conditioning use 0/1), or "scalar", a per-call value guidance
             does not double (HunyuanVideo's embedded guidance: the null pass gets the prompt's value).
             `arg` is the forward argument it feeds when that differs from the graph input's name (the
             graph's names must not collide with the step graph's own inputs, e.g. `guidance`).
  null       the conditioning classifier-free guidance pairs with the prompt (the null label, the empty
             prompt's embeddings): batch-1 arrays, saved beside the graphs as NULL_FILE, hashed here
  family     for a model vdit knows by class (vdit_deploy/families/): the adapter's name, what the model
             is fed (its layout) and the fixed arguments derived from the latent shape, so that every
             stage rebuilds the same module from the export alone; {} for anything else
The built-in VideoDiT is one instance: cond = (y int32 (batch,), classes=num_classes), null y = num_classes.
Torch-free: runtimes read it.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vdit_deploy import validate as v
from vdit_deploy.schedules import Schedule
from vdit_deploy.errors import VditError

# output kind -> (channels as a multiple of C, the sampler's prediction type)
OUTPUTS = {"eps": (1, "eps"), "eps+var": (2, "eps"), "v": (1, "v"), "x0": (1, "x0"), "flow": (1, "flow")}
DTYPES = ("float32", "float16", "int32", "int64", "bool")
NULL_FILE = "null_cond.safetensors"
BATCH = "batch"
BUILTIN = "vdit_deploy.model:VideoDiT"     # the built-in model's class (vdit.model)
ROLES = ("cond", "mask", "scalar")
# the graphs' own input names (export/onnx_export.py): a conditioning input may not take one
RESERVED = ("x_t", "t", "out", "guidance", "coefs", "noise", "x0_prev", "corr", "x_prev", "x0", "corr_next")


@dataclass(frozen=True)
class CondInput:
    name: str
    dtype: str                      # DTYPES
    shape: tuple                    # ("batch", "seq", 4096): ints and axis names, "batch" first
    classes: int | None = None      # an int label input: values 0..classes-1 (classes = the null label)
    doc: str = ""
    role: str = "cond"              # ROLES: cond, mask (0/1), scalar (per call, not doubled by guidance)
    arg: str = ""                   # the forward argument it feeds ("": the same as name)

    def __post_init__(self):
        if self.role not in ROLES:
            raise VditError(f"cond input {self.name}: role must be one of {', '.join(ROLES)}, got {self.role!r}")

    def __str__(self) -> str:
        role = "" if self.role == "cond" else f" {self.role}"
        return f"{self.name}: {self.dtype}({', '.join(map(str, self.shape))}){role}"

    @property
    def argument(self) -> str:
        return self.arg or self.name

    def to_dict(self) -> dict:
        out = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        return {**out, **({"classes": self.classes} if self.classes is not None else {}),
                **({"doc": self.doc} if self.doc else {}), **({"role": self.role} if self.role != "cond" else {}),
                **({"arg": self.arg} if self.arg and self.arg != self.name else {})}


@dataclass(frozen=True)
class Contract:
    latent: tuple                   # (C, F, H, W)
    output: str                     # OUTPUTS
    cond: tuple                     # CondInput, in argument order
    schedule: Schedule = field(default_factory=Schedule)   # or a FlowSchedule
    axes: dict = field(default_factory=dict)   # named axes other than batch -> (min, max)
    null_sha256: str = ""           # of the null conditioning (null_digest)
    family: dict = field(default_factory=dict)   # {"name", "layout", "args"} of a known family (families/)

    def __post_init__(self):
        if self.output not in OUTPUTS:
            raise VditError(f"unknown model output kind {self.output!r}: it must be one of {', '.join(OUTPUTS)} "
                            "(eps+var: eps and a learned variance in 2C channels; flow: the velocity noise - x0)")
        if (self.output == "flow") != (self.schedule.kind == "flow"):
            raise VditError(f"a {self.output} model output needs a {'flow-matching' if self.output == 'flow' else 'DDPM'} "
                            f"schedule, got {self.schedule.kind}")
        names = [c.name for c in self.cond]
        taken = sorted(set(RESERVED) & set(names))
        if len(set(names)) != len(names) or taken:
            raise VditError(f"conditioning input names must be unique and none of the graphs' own inputs "
                            f"({', '.join(RESERVED)}): {', '.join(taken) or 'a name repeats'}")

    # ---- what the stages ask -------------------------------------------------------------------
    @property
    def video_shape(self) -> tuple:
        return tuple(self.latent)

    @property
    def out_channels(self) -> int:
        return OUTPUTS[self.output][0] * self.latent[0]

    @property
    def prediction(self) -> str:
        return OUTPUTS[self.output][1]

    @property
    def names(self) -> tuple:
        return tuple(c.name for c in self.cond)

    def label_input(self) -> CondInput | None:
        """The class-label input, when the conditioning is exactly one (batch,) int label."""
        if len(self.cond) == 1 and self.cond[0].classes is not None:
            return self.cond[0]
        return None

    def labels(self, labels) -> dict:
        """Class labels -> the conditioning dict, range-checked (the null label is not a class)."""
        spec = self.label_input()
        if spec is None:
            raise VditError(f"this model is conditioned on {self.describe_cond()}, not on class labels: "
                            "pass --cond FILE.safetensors")
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
        bad = y[(y < 0) | (y >= spec.classes)]
        if bad.size:
            raise VditError(f"label {int(bad[0])} is out of range: this model has labels 0..{spec.classes - 1}")
        return {spec.name: y.astype(spec.dtype)}

    def describe_cond(self) -> str:
        axes = "".join(f", {k} {lo}..{hi}" for k, (lo, hi) in self.axes.items())
        return "; ".join(map(str, self.cond)) + axes if self.cond else "nothing (unconditional)"

    def check_cond(self, cond: dict, batch: int | None = None, what: str = "conditioning") -> dict:
        """cond -> the same arrays in the contract's dtypes, refusing missing or unknown names, wrong
        ranks, fixed dims or batch, and named axes that disagree or leave their range: one line that
        states the contract. Returns a dict in contract order."""
        if not isinstance(cond, dict):
            raise VditError(f"{what} must be a dict of named arrays ({self.describe_cond()})")
        self.check_names(cond, what)
        sizes = {} if batch is None else {BATCH: batch}
        out = {}
        for spec in self.cond:
            a = np.asarray(cond[spec.name])
            ok_dtype = a.dtype == np.dtype(spec.dtype) or (
                np.issubdtype(a.dtype, np.integer) and spec.dtype in ("int32", "int64")) or (
                np.issubdtype(a.dtype, np.floating) and spec.dtype in ("float32", "float16"))
            if not ok_dtype or a.ndim != len(spec.shape):
                raise VditError(f"{what} {spec.name} is {a.dtype}{list(a.shape)}, the model takes {spec} "
                                f"({self.describe_cond()})")
            for axis, (want, got) in enumerate(zip(spec.shape, a.shape)):
                if isinstance(want, int):
                    if got != want:
                        raise VditError(f"{what} {spec.name} has {got} at axis {axis}, the model takes {spec}")
                    continue
                if want in sizes and sizes[want] != got:
                    raise VditError(f"{what} {spec.name} has {want} = {got} where the rest has {sizes[want]} "
                                    f"({self.describe_cond()})")
                lo, hi = self.axes.get(want, (1, None))
                if got < lo or (hi is not None and got > hi):
                    allowed = (f"outside {lo}..{hi} the export takes (the range `vdit export --seq MIN:MAX` sets)"
                               if hi is not None else f"below {lo}")
                    raise VditError(f"{what} {spec.name} has {want} = {got}, {allowed}")
                sizes[want] = got
            if spec.classes is not None and a.size and (a.min() < 0 or a.max() > spec.classes):
                raise VditError(f"{what} {spec.name} holds labels outside 0..{spec.classes} ({spec.classes} = null)")
            if spec.role == "mask" and a.size and not np.isin(a, (0, 1)).all():
                raise VditError(f"{what} {spec.name} is a mask: its values must be 0 or 1")
            out[spec.name] = np.ascontiguousarray(a, dtype=spec.dtype)
        return out

    def check_names(self, names, what: str) -> None:
        """Refuse missing and unknown input names, naming a few of each (a file may hold 10^5)."""
        missing = [c.name for c in self.cond if c.name not in names]
        unknown = sorted(map(str, set(names) - set(self.names)))
        if missing or unknown:
            parts = [f"lacks {_names(missing)}" if missing else "", f"has unknown {_names(unknown)}" if unknown else ""]
            raise VditError(f"{what} {' and '.join(filter(None, parts))}: the model takes {self.describe_cond()}")

    def batch_of(self, cond: dict) -> int:
        if not self.cond:
            raise VditError("an unconditional model: give the number of videos")
        return int(np.asarray(cond[self.cond[0].name]).shape[0])

    def null_batch(self, null: dict, cond: dict) -> dict:
        """The null conditioning (batch 1) repeated to the batch of `cond`, its named axes checked
        against cond's (an empty prompt padded to another length than the prompt's is refused)."""
        b = self.batch_of(cond)
        out = {}
        for spec in self.cond:
            n, c = np.asarray(null[spec.name]), np.asarray(cond[spec.name])
            if spec.role == "scalar":      # per call: the null pass gets the prompt's own value
                out[spec.name] = np.array(c)
                continue
            if n.shape[1:] != c.shape[1:]:
                raise VditError(f"the null conditioning's {spec.name} is {list(n.shape)}, the prompt's "
                                f"{list(c.shape)}: make both with the same length (pad to max_length)")
            out[spec.name] = np.repeat(n.astype(c.dtype, copy=False), b, axis=0)   # writable: torch takes it
        return out

    def axis_sizes(self, cond: dict) -> dict:
        """The named axes' sizes in `cond` (the null conditioning's token count: the one guidance takes)."""
        return {d: int(np.asarray(cond[spec.name]).shape[i]) for spec in self.cond
                for i, d in enumerate(spec.shape) if isinstance(d, str) and d != BATCH}

    def example_cond(self, batch: int, rng: np.random.Generator, sizes: dict | None = None) -> dict:
        """Random conditioning of this contract (exports trace it, verify and benchmarks feed it):
        labels in range, floats N(0, 1), masks 0/1 (each row keeps a random prefix of its tokens: a
        padded prompt), scalars in 1..8; named axes at `sizes` or their max."""
        out = {}
        for spec in self.cond:
            shape = [batch if d == BATCH else d if isinstance(d, int) else
                     (sizes or {}).get(d, self.axes.get(d, (1, 16))[1]) for d in spec.shape]
            if spec.classes is not None:
                a = rng.integers(0, spec.classes, shape)
            elif spec.role == "mask":
                keep = rng.integers(1, shape[-1] + 1, shape[:-1])[..., None] if len(shape) > 1 else 1
                a = np.arange(shape[-1]) < keep if len(shape) > 1 else np.ones(shape, bool)
            elif spec.role == "scalar":
                a = rng.uniform(1, 8, shape)
            elif spec.dtype == "bool":
                a = np.ones(shape, bool)
            elif spec.dtype.startswith("int"):
                a = np.ones(shape)
            else:
                a = rng.standard_normal(shape)
            out[spec.name] = a.astype(spec.dtype)
        return out

    # ---- stored form ---------------------------------------------------------------------------
    def sha256(self) -> str:
        """Of the contract as stored: what engines and calibration sets must match."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict:
        return {"latent": list(self.latent), "output": self.output, "cond": [c.to_dict() for c in self.cond],
                "schedule": self.schedule.to_dict(), "axes": {k: list(r) for k, r in self.axes.items()},
                "null_sha256": self.null_sha256, **({"family": self.family} if self.family else {})}

    @classmethod
    def from_dict(cls, data, where: str = "contract") -> "Contract":
        v.obj(data, "model contract", required=("latent", "output", "cond", "schedule", "axes", "null_sha256"),
              optional=("family",), where=where)
        latent = tuple(v.int_list(data["latent"], "latent shape", 4, 1, v.INT32_MAX, where))
        output = v.string(data["output"], "output kind", tuple(OUTPUTS), where)
        axes = v.obj(data["axes"], "named axes", where=where, extra_ok=True)
        ranges = {}
        for name, r in axes.items():
            lo, hi = v.int_list(r, f"axis {name} range", 2, 1, v.INT32_MAX, where)
            if lo > hi or name == BATCH:
                v.fail(where, f"axis {name} range must be MIN <= MAX (and not the batch), got {r}")
            ranges[name] = (lo, hi)
        if not isinstance(data["cond"], list):
            v.fail(where, "cond must be a list")
        cond = []
        for item in data["cond"]:
            v.obj(item, "a cond input", required=("name", "dtype", "shape"), optional=("classes", "doc", "role", "arg"),
                  where=where)
            shape = item["shape"]
            if not isinstance(shape, list) or not shape or shape[0] != BATCH or not all(
                    (isinstance(d, int) and not isinstance(d, bool) and d >= 1) or (isinstance(d, str) and d in ranges)
                    for d in shape[1:]):
                v.fail(where, f"cond {v.show(item['name'])} shape must start with 'batch', then sizes or named axes "
                              f"with ranges, got {v.show(shape)}")
            classes = item.get("classes")
            cond.append(CondInput(v.identifier(item["name"], "a cond input name", where),
                                  v.string(item["dtype"], "a cond dtype", DTYPES, where), tuple(shape),
                                  None if classes is None else v.integer(classes, "classes", 1, v.INT32_MAX, where),
                                  v.string(item.get("doc", ""), "doc", where=where) if "doc" in item else "",
                                  v.string(item.get("role", "cond"), "a cond role", ROLES, where),
                                  v.identifier(item["arg"], "a cond argument", where) if "arg" in item else ""))
        if len({c.name for c in cond}) != len(cond) or set(RESERVED) & {c.name for c in cond}:
            v.fail(where, f"cond input names must be unique and none of {', '.join(RESERVED)} (the graphs' own inputs)")
        family = data.get("family", {})
        v.obj(family, "family", where=where, extra_ok=True)
        if family:
            v.obj(family, "family", required=("name", "layout", "args"), where=where)
            v.identifier(family["name"], "family name", where)
            v.string(family["layout"], "family layout", where=where)
            v.obj(family["args"], "family args", where=where, extra_ok=True)
        null = data["null_sha256"]
        return cls(latent, output, tuple(cond), Schedule.from_dict(data["schedule"], where), ranges,
                   v.sha256_hex(null, "null_sha256", where) if null else "", dict(family))


def _names(names: list, shown: int = 4) -> str:
    """A few names of a list that may be 10^5 long (an error stays one short line)."""
    head = ", ".join(str(n)[:40] for n in names[:shown])
    return head + (f" and {len(names) - shown} more" if len(names) > shown else "")


def timestep_doc(schedule) -> str:
    """What the denoiser's t input holds (the exports' io doc)."""
    T = schedule.num_timesteps
    return f"flow timestep sigma * {T} (float)" if schedule.kind == "flow" else f"diffusion timestep 0..{T - 1}"


# ---- the null conditioning ------------------------------------------------------------------------
def null_digest(null: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(null):
        a = np.ascontiguousarray(null[name])
        h.update(f"{name}:{a.dtype}:{list(a.shape)}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def check_null(contract: Contract, null: dict) -> dict:
    """The null conditioning: one row per input, in the contract's dtypes."""
    return contract.check_cond(null, 1, "null conditioning")


def save_null(null: dict, directory: Path) -> Path:
    from safetensors.numpy import save_file

    path = Path(directory) / NULL_FILE
    save_file({k: np.ascontiguousarray(a) for k, a in null.items()}, str(path))
    path.chmod(0o644)   # as readable as the graphs beside it (a server may run as another user)
    return path


def load_null(contract: Contract, directory: Path) -> dict:
    """NULL_FILE beside the graphs, checked against the contract's hash."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(directory) / NULL_FILE
    if not contract.cond:
        return {}
    if not path.is_file():
        raise VditError(f"{path.parent} has no {NULL_FILE} (the null conditioning guidance needs); re-export")
    try:
        null = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise VditError(f"{path} is not a readable safetensors file: {e}") from None
    null = check_null(contract, null)
    if null_digest(null) != contract.null_sha256:
        raise VditError(f"{path} is not the null conditioning these graphs were exported with (its hash differs); "
                        "re-export")
    return null


def read_cond(path: str | Path, contract: Contract) -> dict:
    """A --cond file (.safetensors, one tensor per conditioning input, batch first) -> checked arrays."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from vdit_deploy.config import check_memory
    from vdit_deploy.weights import read_header

    path = Path(path)
    if not path.exists():
        raise VditError(f"{path}: no such conditioning file")
    try:   # the header first: a regular file, tensors that fit in it; names checked before any is read
        header = read_header(path)
    except VditError as e:
        raise VditError(f"{path} is not a readable safetensors file ({str(e).removeprefix(str(path)).lstrip(': ')}); "
                        f"the model takes {contract.describe_cond()}") from None
    contract.check_names(header, str(path))
    rows = header[contract.cond[0].name].shape[0] if contract.cond and header[contract.cond[0].name].shape else 0
    # the file twice (read, checked) and a sampling loop over its rows (~32 bytes per latent value each)
    check_memory(2 * sum(t.nbytes for t in header.values()) + 32 * rows * math.prod(contract.latent),
                 f"{rows:,} conditioning rows of {path}")
    try:
        cond = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise VditError(f"{path} is not a readable safetensors file ({e}); the model takes "
                        f"{contract.describe_cond()}") from None
    for name, a in cond.items():
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise VditError(f"{path}: {name} holds NaN or inf")
    return contract.check_cond(cond, what=str(path))
