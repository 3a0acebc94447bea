"""Where a denoiser comes from: a vdit checkpoint or a diffusers model directory -> a torch module and
its model contract (contract.py). Export, verify and the torch runtime load models only through here.

    vdit checkpoint    config.json (format vdit-checkpoint/1) + model.safetensors: the built-in VideoDiT
    diffusers model    config.json (_class_name) + diffusion_pytorch_model*.safetensors (sharded or not),
                       as `save_pretrained` writes it; the families in vdit_deploy/families/ (Latte,
                       CogVideoX, Wan, LTX-Video, Mochi, HunyuanVideo) are known by class, any other
                       diffusers ModelMixin is named as module:Class with its conditioning inputs given.
                       The weights are the files weights.py chooses (an index's shards, or the one file),
                       loaded strictly (diffusers_models.py): the class comes from diffusers or the user's
                       --class, never from a name in a file.
                       The schedule and prediction type come from a scheduler_config.json beside the
                       model (or in ../scheduler/, the pipeline layout), or from options.
Weights are read from safetensors only: nothing is ever unpickled.
Python callers with their own nn.Module build a Source directly: Source(module, contract, null, ...).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vdit_deploy.contract import BATCH, BUILTIN, CondInput, Contract, check_null, null_digest
from vdit_deploy.schedules import Schedule
from vdit_deploy.scheduler_config import read_scheduler_config
from vdit_deploy.errors import VditError
from vdit_deploy.weights import DIFFUSERS_WEIGHTS, all_tensors, diffusers_weight_files

SCHEDULER_CONFIG = "scheduler_config.json"
DEFAULT_MAX_TOKENS = 120        # a --input's named axis' upper end without --seq
NULL_LIMIT = 1 << 30            # bytes of null conditioning (a T5-XXL prompt of 512 tokens: 8 MB)


@dataclass
class Source:
    """A denoiser in PyTorch: module(x_t, t, *cond in contract order) -> out, and what it promises."""
    module: nn.Module
    contract: Contract
    null: dict                       # name -> batch-1 numpy array (the null conditioning)
    model: dict = field(default_factory=lambda: {"class": "custom", "config": {}})
    path: Path | None = None
    files: list = field(default_factory=list)   # what was loaded (model_files), hashed by sha256

    def __post_init__(self):
        self.null = check_null(self.contract, self.null)
        digest = null_digest(self.null)
        if self.contract.null_sha256 != digest:   # the contract hashes the null it travels with
            self.contract = replace(self.contract, null_sha256=digest)

    @cached_property
    def sha256(self) -> str:
        """Of the files it was loaded from (exports record it); hashed when asked: sampling does not."""
        from vdit_deploy.files import sha256_files

        return sha256_files(self.files) if self.files else ""


def model_files(path) -> list:
    """The files a model directory's weights hash covers, the ones its loader reads: a vdit checkpoint's
    model.safetensors; a diffusers model's config.json, then its index and the shards it names, or its
    one safetensors file (weights.diffusers_weight_files; none: a one-line refusal)."""
    from vdit_deploy.checkpoint import read_info

    path = Path(path)
    if not is_diffusers_dir(path):
        return [read_info(path).weights]
    return [path / "config.json", *diffusers_weight_files(path)[0]]


# ---- the built-in model ---------------------------------------------------------------------------
def builtin_contract(cfg, schedule: Schedule) -> Contract:
    return Contract(latent=tuple(cfg.video_shape), output="flow" if schedule.kind == "flow" else "eps", schedule=schedule,
                    cond=(CondInput("y", "int32", (BATCH,), cfg.num_classes,
                                    f"class label 0..{cfg.num_classes - 1}"),))


def load_checkpoint_source(path, device: str = "cpu") -> Source:
    from vdit_deploy.checkpoint import load_model

    model, info = load_model(path, device)
    contract = builtin_contract(info.model, info.schedule)
    return Source(model, contract, {"y": np.array([info.model.null_label], np.int32)},
                  {"class": BUILTIN, "config": info.model.to_dict()}, Path(path), [info.weights])


# ---- diffusers models -----------------------------------------------------------------------------
class DiffusersDenoiser(nn.Module):
    """A diffusers transformer behind the contract's signature: (x_t, t, *cond) -> out (B, k*C, F, H, W)."""

    def __init__(self, net: nn.Module, cond_names: tuple, video_input: str = "hidden_states"):
        super().__init__()
        self.net, self.cond_names, self.video_input = net, tuple(cond_names), video_input

    def forward(self, x_t, t, *cond):
        kwargs = {self.video_input: x_t, "timestep": t, **dict(zip(self.cond_names, cond))}
        return self.net(**kwargs, return_dict=False)[0]


def adapt(net: nn.Module, contract: Contract) -> nn.Module:
    """The loaded model behind the contract's signature: its family's adapter (rebuilt from the contract's
    record alone), else forward's keyword arguments in contract order."""
    if contract.family:
        from vdit_deploy import families

        return families.by_name(contract.family["name"]).adapter(net, contract)
    return DiffusersDenoiser(net, tuple(c.argument for c in contract.cond))


def is_diffusers_dir(path: Path) -> bool:
    """config.json is an object naming a _class_name (refused in one line when it is no JSON object
    but diffusers weights lie beside it: not mistaken for a vdit checkpoint without model.safetensors)."""
    from vdit_deploy.files import read_json

    path = Path(path)
    try:
        config = read_json(path / "config.json", "model config", root=path)
    except VditError:
        config = None
        if not _has_diffusers_weights(path):
            return False
        raise
    if isinstance(config, dict) and isinstance(config.get("_class_name"), str):
        return True
    if _has_diffusers_weights(path) and not (path / "model.safetensors").exists():
        raise VditError(f"{path / 'config.json'} is not a diffusers model config (a JSON object with _class_name), "
                        f"though {DIFFUSERS_WEIGHTS} weights lie beside it; got {type(config).__name__} "
                        f"{json.dumps(config)[:60] if isinstance(config, (dict, list)) else ''}".strip())
    return False


def _has_diffusers_weights(path: Path) -> bool:
    return path.is_dir() and any(path.glob(f"{DIFFUSERS_WEIGHTS}*"))


def token_count(config: dict, latent) -> int | None:
    """The tokens a diffusers video DiT makes of a latent (C, F, H, W): F / patch_size_t x H / p x W / p,
    patch_size an int or (t, h, w) (Wan's); None when the config's patch sizes are not positive ints (a
    dynamic shift, which is computed from it, is then refused)."""
    p = config.get("patch_size") or 1
    sizes = (list(p) if isinstance(p, (list, tuple)) and len(p) == 3 else [config.get("patch_size_t") or 1, p, p])
    sizes += [int(d) if isinstance(d, int) and not isinstance(d, bool) else 0 for d in latent[1:]]
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in sizes):
        return None
    pt, ph, pw, f, h, w = sizes
    return max(1, -(-f // pt)) * max(1, h // ph) * max(1, w // pw)


def scheduler_options(model_dir: Path, scheduler_config: Path | None, seq_len: int | None = None, family=None):
    """(schedule, prediction, variance) from a scheduler_config.json: the one given, beside the model
    or in ../scheduler (a pipeline's layout); None when there is none. seq_len: the model's token count
    (a dynamic shift comes from it). family: a known family, whose pipeline's sigmas the schedule takes."""
    candidates = [scheduler_config] if scheduler_config else [model_dir / SCHEDULER_CONFIG,
                                                              model_dir.parent / "scheduler" / SCHEDULER_CONFIG]
    from vdit_deploy.files import read_json

    for file in candidates:
        if file is not None and Path(file).exists():
            data = read_json(file, "scheduler config")
            try:
                schedule, *rest = read_scheduler_config(data, str(file), seq_len)
                return (family.pipeline_schedule(schedule) if family else schedule, *rest)
            except VditError as e:   # name the file the value came from
                raise VditError(str(e) if str(file) in str(e) else f"{file}: {e}") from None
    if scheduler_config:
        raise VditError(f"{scheduler_config}: no such scheduler config")
    return None


def parse_cond_spec(text: str, axes: dict) -> CondInput:
    """NAME:DTYPE:DIMS, DIMS comma-separated ints or axis names after batch, e.g.
    encoder_hidden_states:float32:seq,4096 (the batch axis is implied)."""
    from vdit_deploy import validate as v

    parts = text.split(":")
    if len(parts) != 3:
        raise VditError(f"--input must be NAME:DTYPE:DIMS (e.g. encoder_hidden_states:float32:seq,4096), got {text!r}")
    name, dtype, dims = parts
    shape = [BATCH]
    for d in filter(None, dims.split(",")):
        if d.isdigit() and 1 <= int(d) <= v.INT32_MAX:
            shape.append(int(d))
            continue
        if d == BATCH or not d.isidentifier():
            raise VditError(f"--input {text}: each dimension is a size 1..{v.INT32_MAX} or an axis name "
                            f"(letters, digits, _), got {d!r}")
        shape.append(d)
        axes.setdefault(d, (1, DEFAULT_MAX_TOKENS))
    spec = {"name": name, "dtype": dtype, "shape": shape}
    contract = Contract.from_dict({"latent": [1, 1, 1, 1], "output": "eps", "cond": [spec],
                                   "axes": {k: list(r) for k, r in axes.items()},
                                   "schedule": Schedule().to_dict(), "null_sha256": ""}, f"--input {text}")
    v.identifier(name, "--input name")
    return contract.cond[0]


def load_diffusers_source(path, device: str = "cpu", class_name: str | None = None, output: str | None = None,
                          scheduler_config=None, schedule: Schedule | None = None, null_file=None,
                          inputs: tuple = (), seq: tuple | None = None, latent: tuple | None = None,
                          contract: Contract | None = None, class_typed: bool = True, batch: int = 2) -> Source:
    """contract: load with this contract (an export's) instead of deriving one from the options.
    class_name: the caller's module:Class (imported); class_typed=False: a name read from a file (an
    export's), resolved only among diffusers' own classes. batch: the videos per call it must fit."""
    from vdit_deploy.config import check_memory
    from vdit_deploy.diffusers_models import build, estimate_bytes, model_class
    from vdit_deploy.files import read_json

    path = Path(path)
    config = read_json(path / "config.json", "model config", root=path)
    files, headers = diffusers_weight_files(path)
    cls_name = class_name or f"diffusers:{config['_class_name']}"
    cls = model_class(cls_name, typed=class_typed and class_name is not None)
    if contract is None:
        contract = diffusers_contract(path, config, cls_name, output, scheduler_config, schedule, inputs, seq, latent)
    check_null_size(contract)
    null = read_null(null_file, contract) if null_file else zero_null(contract)   # refused before loading
    check_memory(estimate_bytes(all_tensors(headers), config, contract.latent, batch), f"loading {path}")
    net = build(cls, config, path, files, headers, cls_name)
    module = adapt(net, contract).to(device).eval()
    return Source(module, contract, null, {"class": cls_name, "config": dict(config)}, path,
                  [path / "config.json", *files])


def check_null_size(contract: Contract) -> None:
    """The null conditioning at each named axis' max is allocated whole (zero_null): sized first."""
    import math

    from vdit_deploy.config import check_memory

    nbytes = sum(np.dtype(c.dtype).itemsize * math.prod(d if isinstance(d, int) else 1 if d == BATCH else
                                                        contract.axes[d][1] for d in c.shape) for c in contract.cond)
    if nbytes > NULL_LIMIT:
        raise VditError(f"the null conditioning at the named axes' max ({contract.describe_cond()}) would take "
                        f"{nbytes / 2 ** 30:,.1f} GiB; give a smaller --seq")
    check_memory(nbytes * 4, f"the null conditioning at {contract.describe_cond()}")


def diffusers_contract(path: Path, config: dict, cls_name: str, output, scheduler_config, schedule, inputs, seq,
                       latent) -> Contract:
    """The contract of a diffusers model: a known family's (families/) from its config; another class's
    conditioning and latent are given."""
    from vdit_deploy import families
    from vdit_deploy import validate as v

    where = str(path / "config.json")
    size = lambda key, required=True: (v.integer(config[key], key, 1, v.INT32_MAX, where) if key in config else
                                       v.fail(where, f"the {cls_name} config lacks {key}") if required else None)
    family = families.by_class(cls_name)
    if family is not None and inputs:   # a known family's conditioning: an --input would be silently ignored
        raise VditError(f"--input is for models vdit does not know; {family.cls}'s conditioning is known "
                        "(`vdit info DIR` shows it): drop --input")
    axes, record = {}, {}
    if family is not None:
        family.check(path, config)
        axes["seq"] = tuple(seq or (1, family.max_tokens))
        for key in getattr(family, "int_fields", ()):     # sizes it reads: positive integers, in range
            size(key)
        try:       # the adapter reads the config's fields: a missing or mistyped one is one line
            cond = family.cond(config)
            latent = tuple(latent or family.latent(config))
            record = family.record(config, latent)
        except KeyError as e:
            raise VditError(f"{where}: the {family.cls} config lacks {e.args[0]}") from None
        except (TypeError, ValueError, ArithmeticError) as e:
            raise VditError(f"{where}: a {family.cls} config field vdit cannot read ({type(e).__name__}: {e})") from None
    else:
        if not inputs or latent is None:
            raise VditError(f"{cls_name} is not a model vdit knows: give its conditioning (--input NAME:DTYPE:DIMS, "
                            "one per forward argument) and --latent C,F,H,W")
        cond = tuple(parse_cond_spec(text, axes) for text in inputs)
        names = [c.name for c in cond]
        twice = sorted({n for n in names if names.count(n) > 1} | ({"x_t", "t"} & set(names)))
        if twice:
            raise VditError(f"--input names must be unique and not x_t or t: {', '.join(twice)}")
        if seq:
            if not axes:
                raise VditError("--seq sets the range of named axes, and no --input has one (e.g. NAME:float32:seq,768)")
            axes = {name: tuple(seq) for name in axes}
    for key in ("in_channels", "out_channels"):
        if config.get(key) is not None:
            size(key)
    if family is not None and not any("seq" in c.shape for c in cond):
        axes.pop("seq", None)
    from_scheduler = scheduler_options(path, scheduler_config, token_count(config, latent), family)
    if from_scheduler is None and (schedule is None or output is None):   # refuse rather than guess
        raise VditError(f"{path} has no {SCHEDULER_CONFIG} beside it or in ../scheduler: pass --scheduler-config "
                        "FILE (the noise schedule and what the model predicts)")
    prediction = "eps"
    if from_scheduler is not None:
        sched_from_file, prediction, _ = from_scheduler
        schedule = schedule or sched_from_file
    in_channels = int(config.get("in_channels", latent[0]))
    out_channels = int(config.get("out_channels") or in_channels)
    if output is None:   # refuse what cannot be told apart rather than guess
        if out_channels == 2 * in_channels and prediction == "eps":
            output = "eps+var"
        elif out_channels == in_channels:
            output = prediction
        else:
            raise VditError(f"{path}: cannot tell the output kind ({out_channels} output channels for {in_channels} "
                            f"in, prediction {prediction}); pass --output eps, eps+var, v or x0")
    contract = Contract(latent=tuple(latent), output=output, cond=cond, schedule=schedule, axes=axes, family=record)
    if contract.out_channels != out_channels:
        raise VditError(f"{path}: output kind {output} means {contract.out_channels} output channels, the model "
                        f"has {out_channels}")
    return contract


def zero_null(contract: Contract) -> dict:
    """Zeros at each named axis' max (labels: the null label; int and bool inputs: ones); a mask keeps its
    first token only (an empty prompt's mask: all zeros would leave attention nothing to attend to); a
    per-call scalar is stored but unused (the null pass takes the prompt's value). Text models want the
    empty prompt's embeddings instead: pass them as --null (README: your own model)."""
    null = {}
    for spec in contract.cond:
        shape = [1 if d == BATCH else d if isinstance(d, int) else contract.axes[d][1] for d in spec.shape]
        value = spec.classes if spec.classes is not None else 1 if spec.dtype in ("bool", "int32", "int64") \
            or spec.role == "scalar" else 0
        try:
            null[spec.name] = np.full(shape, value, spec.dtype)
        except (ValueError, TypeError, MemoryError) as e:   # a shape no array can have (a forged config)
            raise VditError(f"the null conditioning {spec.name} {shape} cannot be made: {e}") from None
        if spec.role == "mask":
            null[spec.name][..., 0] = 1
    return null


def read_null(path, contract: Contract) -> dict:
    from vdit_deploy.contract import read_cond

    null = read_cond(path, contract)
    if contract.batch_of(null) != 1:
        raise VditError(f"{path}: the null conditioning is one row (batch 1), got {contract.batch_of(null)}")
    return null


def load_source(path, device: str = "cpu", **options) -> Source:
    """A vdit checkpoint or a diffusers model directory -> Source. options: load_diffusers_source's."""
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").exists():
        raise VditError(f"{path} is not a model directory (a vdit checkpoint or a diffusers save_pretrained "
                        "directory, with config.json)")
    if is_diffusers_dir(path):
        return load_diffusers_source(path, device, **options)
    _no_diffusers_options(path, options)
    return load_checkpoint_source(path, device)


def _no_diffusers_options(path, options: dict) -> None:
    given = [k for k, val in options.items() if val not in (None, ())]
    if given:
        raise VditError(f"{path} is a vdit checkpoint: {', '.join(given)} are for diffusers models")


def source_contract(path, **options) -> tuple[Contract, dict]:
    """A model directory's contract and null conditioning as load_source would give them, without
    loading the weights: what a command checks its conditioning against before any work."""
    path = Path(path)
    if is_diffusers_dir(path):
        from vdit_deploy.files import read_json

        config = read_json(path / "config.json", "model config", root=path)
        o = {"schedule": None, "inputs": (), "seq": None, "latent": None, **options}
        contract = diffusers_contract(path, config, o.get("class_name") or f"diffusers:{config['_class_name']}",
                                      o.get("output"), o.get("scheduler_config"), o["schedule"], o["inputs"], o["seq"],
                                      o["latent"])
        null = read_null(o["null_file"], contract) if o.get("null_file") else zero_null(contract)
    else:
        from vdit_deploy.checkpoint import read_info

        _no_diffusers_options(path, options)
        info = read_info(path)
        contract = builtin_contract(info.model, info.schedule)
        null = {"y": np.array([info.model.null_label], np.int32)}
    null = check_null(contract, null)
    return replace(contract, null_sha256=null_digest(null)), null


def load_export_source(meta, export_dir, checkpoint=None, device: str = "cpu", class_name: str | None = None) -> Source:
    """The model an export was made from (`checkpoint`, default the path its metadata records), loaded
    with the export's contract and null conditioning, and refused when its weights differ (verify).
    The class its metadata names is resolved among diffusers' own classes only; any other is imported
    only as the `class_name` the user typed, which must be the one the export names."""
    from vdit_deploy.checkpoint import read_info
    from vdit_deploy.contract import load_null
    from vdit_deploy.files import sha256_files

    recorded = checkpoint or meta.checkpoint_path
    if not recorded:   # Path("") would be "."
        raise VditError(f"{export_dir} was exported from a module in Python (export_source) and records no model "
                        "directory: pass that Source (verify(export_dir, source=...)) or a model directory "
                        "(--checkpoint DIR)")
    path = Path(recorded)
    if not (path / "config.json").is_file():
        raise VditError(f"{export_dir}: its source model {path} is not there; pass --checkpoint")

    contract, cls_name = meta.contract, meta.model["class"]
    if cls_name == BUILTIN:
        info = read_info(path)
        if {"class": BUILTIN, "config": info.model.to_dict()} != meta.model or info.schedule != contract.schedule:
            raise VditError(f"{export_dir}: the config or schedule in its metadata differs from {path}'s "
                            "config.json; re-export it")
    elif not is_diffusers_dir(path):
        raise VditError(f"{path} is not a diffusers model directory ({export_dir} was exported from one)")
    elif class_name is not None and class_name != cls_name:
        raise VditError(f"{export_dir} was exported from {cls_name}, not --class {class_name}")
    elif class_name is None and not cls_name.startswith("diffusers:"):
        raise VditError(f"{export_dir} was exported from {cls_name}, which is not one of diffusers' own classes: "
                        f"pass --class {cls_name} to import it (an export never names code to run)")
    if cls_name != BUILTIN:   # the schedule beside the model, when there is one, is the export's
        from vdit_deploy.files import read_json

        config = read_json(path / "config.json", "model config", root=path)
        from vdit_deploy import families

        beside = scheduler_options(path, None, token_count(config, contract.latent),   # a dynamic shift's tokens
                                   families.by_class(cls_name))
        if beside is not None and beside[0] != contract.schedule:
            raise VditError(f"{export_dir}: the schedule in its metadata differs from {path}'s scheduler config "
                            "(edited, or exported with another --scheduler-config); re-export it")
    if sha256_files(model_files(path)) != meta.checkpoint_sha256:   # before loading it
        raise VditError(f"{path} is not the model {export_dir} was exported from (sha256 differs)")
    if cls_name == BUILTIN:
        source = load_checkpoint_source(path, device)
    else:
        source = load_diffusers_source(path, device, class_name=cls_name, contract=contract,
                                       class_typed=class_name is not None)
    source.null = load_null(contract, Path(export_dir))
    source.contract = contract
    return source
