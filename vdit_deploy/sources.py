"""Where a denoiser comes from: a vdit checkpoint or a diffusers model directory -> a torch module and
its model contract (contract.py). Export, verify and the torch runtime load models only through here.

    vdit checkpoint    config.json (format vdit-checkpoint/1) + model.safetensors: the built-in VideoDiT
    diffusers model    config.json (_class_name) + diffusion_pytorch_model*.safetensors (sharded or not),
                       as `save_pretrained` writes it; the families in vdit_deploy/families/ (Latte,
                       CogVideoX, Wan, LTX-Video, Mochi, HunyuanVideo) are known by class, any other
                       diffusers ModelMixin is named as module:Class with its conditioning inputs given.
                       The schedule and prediction type come from a scheduler_config.json beside the
                       model (or in ../scheduler/, the pipeline layout), or from options.
Weights are read from safetensors only: nothing is ever unpickled.
Python callers with their own nn.Module build a Source directly: Source(module, contract, null, ...).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vdit_deploy.contract import BATCH, BUILTIN, CondInput, Contract, check_null, null_digest
from vdit_deploy.schedules import Schedule
from vdit_deploy.errors import VditError

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
SCHEDULER_CONFIG = "scheduler_config.json"
DEFAULT_MAX_TOKENS = 120        # a --input's named axis' upper end without --seq


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
            from dataclasses import replace
            self.contract = replace(self.contract, null_sha256=digest)

    @cached_property
    def sha256(self) -> str:
        """Of the files it was loaded from (exports record it); hashed when asked: sampling does not."""
        from vdit_deploy.files import sha256_files

        return sha256_files(self.files) if self.files else ""


def model_files(path) -> list:
    """The files a model directory's weights hash covers: a vdit checkpoint's model.safetensors; a
    diffusers model's config.json and safetensors shards (none: a one-line refusal)."""
    from vdit_deploy.checkpoint import read_info

    path = Path(path)
    if not is_diffusers_dir(path):
        return [read_info(path).weights]
    weights = sorted(path.glob(f"{DIFFUSERS_WEIGHTS}*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in path.glob(f"{DIFFUSERS_WEIGHTS}*.bin"))
        hint = f" (it has {', '.join(pickled)}: pickle files are never loaded; re-save with safe_serialization)" \
            if pickled else ""
        raise VditError(f"{path} has no {DIFFUSERS_WEIGHTS}*.safetensors{hint}")
    return [path / "config.json", *weights]


# ---- the built-in model ---------------------------------------------------------------------------
def builtin_contract(cfg, schedule: Schedule) -> Contract:
    return Contract(latent=tuple(cfg.video_shape), output="eps", schedule=schedule,
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
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and isinstance(config.get("_class_name"), str)


def scheduler_options(model_dir: Path, scheduler_config: Path | None) -> tuple[Schedule, str, str] | None:
    """(schedule, prediction, variance) from a scheduler_config.json: the one given, beside the model
    or in ../scheduler (a pipeline's layout); None when there is none."""
    candidates = [scheduler_config] if scheduler_config else [model_dir / SCHEDULER_CONFIG,
                                                              model_dir.parent / "scheduler" / SCHEDULER_CONFIG]
    for file in candidates:
        if file is not None and Path(file).is_file():
            try:
                data = json.loads(Path(file).read_text())
            except ValueError as e:
                raise VditError(f"{file} is not valid JSON: {str(e)[:100]}") from None
            return Schedule.from_diffusers(data)
    if scheduler_config:
        raise VditError(f"{scheduler_config}: no such scheduler config")
    return None


def _import_class(name: str):
    module, _, cls = name.partition(":")
    if not module or not cls:
        raise VditError(f"--class must be module:Class (e.g. diffusers:LatteTransformer3DModel), got {name!r}")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise VditError(f"cannot import {name}: {e}") from None


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
        shape.append(int(d) if d.isdigit() else d)
        if isinstance(shape[-1], str) and shape[-1] not in axes:
            axes[shape[-1]] = (1, DEFAULT_MAX_TOKENS)
    spec = {"name": name, "dtype": dtype, "shape": shape}
    contract = Contract.from_dict({"latent": [1, 1, 1, 1], "output": "eps", "cond": [spec],
                                   "axes": {k: list(r) for k, r in axes.items()},
                                   "schedule": Schedule().to_dict(), "null_sha256": ""}, f"--input {text}")
    v.identifier(name, "--input name")
    return contract.cond[0]


def load_diffusers_source(path, device: str = "cpu", class_name: str | None = None, output: str | None = None,
                          scheduler_config=None, schedule: Schedule | None = None, null_file=None,
                          inputs: tuple = (), seq: tuple | None = None, latent: tuple | None = None,
                          contract: Contract | None = None) -> Source:
    """contract: load with this contract (an export's) instead of deriving one from the options."""
    from vdit_deploy.config import check_memory

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    files = model_files(path)
    weights = files[1:]
    cls_name = class_name or f"diffusers:{config['_class_name']}"
    cls = _import_class(cls_name)
    if contract is None:
        contract = diffusers_contract(path, config, cls_name, output, scheduler_config, schedule, inputs, seq, latent)
    weights_bytes = sum(p.stat().st_size for p in weights)
    check_memory(int(weights_bytes * 1.2), f"loading {path}")
    try:
        # without accelerate, diffusers initialises the weights before loading them (twice the memory)
        net = cls.from_pretrained(str(path), use_safetensors=True, torch_dtype=torch.float32,
                                  low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    except Exception as e:   # diffusers raises OSError, ValueError, EnvironmentError...
        raise VditError(f"{cls_name}.from_pretrained({path}) failed: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}") from None
    for name, p in net.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise VditError(f"{path}: {name} holds NaN or inf values")
        p.requires_grad_(False)
    module = adapt(net, contract).to(device).eval()
    null = read_null(null_file, contract) if null_file else zero_null(contract)
    return Source(module, contract, null, {"class": cls_name, "config": dict(config)}, path, files)


def diffusers_contract(path: Path, config: dict, cls_name: str, output, scheduler_config, schedule, inputs, seq,
                       latent) -> Contract:
    """The contract of a diffusers model: a known family's (families/) from its config; another class's
    conditioning and latent are given."""
    from vdit_deploy import families

    family = None if inputs else families.by_class(cls_name)
    axes, record = {}, {}
    if family is not None:
        family.check(path, config)
        if family.objective == "flow" and not families.flow_supported():
            raise VditError(f"{family.cls} is a flow-matching model (default sampler {family.default_sampler}): "
                            "vdit samples DDPM-family schedules only until flow matching lands (issue 20)")
        axes["seq"] = tuple(seq or (1, family.max_tokens))
        cond = family.cond(config)
        latent = tuple(latent or family.latent(config))
        record = family.record(config, latent)
    else:
        if not inputs or latent is None:
            raise VditError(f"{cls_name} is not a model vdit knows: give its conditioning (--input NAME:DTYPE:DIMS, "
                            "one per forward argument) and --latent C,F,H,W")
        if seq:
            axes["seq"] = tuple(seq)
        cond = tuple(parse_cond_spec(text, axes) for text in inputs)
    if not any("seq" in c.shape for c in cond):
        axes.pop("seq", None)
    from_scheduler = scheduler_options(path, scheduler_config)
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


def describe_diffusers_dir(path) -> str:
    """What `vdit export` would take from a diffusers directory, read from its JSON and the safetensors
    headers (no weights loaded): class, contract, parameters."""
    import struct

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    params, files = 0, sorted(path.glob(f"{DIFFUSERS_WEIGHTS}*.safetensors"))
    for file in files:
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        params += sum(int(np.prod(t["shape"])) for k, t in header.items() if k != "__metadata__")
    cls_name = f"diffusers:{config['_class_name']}"
    lines = [f"diffusers model  {path}  ({cls_name})"]
    try:
        c = diffusers_contract(path, config, cls_name, None, None, None, (), None, None)
        lines += [f"contract    latent {list(c.latent)}, output {c.output}, cond {c.describe_cond()}",
                  f"schedule    {json.dumps(c.schedule.to_dict())}"]
        if c.family:
            lines.append(f"family      {c.family['name']}: x_t (B, C, F, H, W), the model is fed {c.family['layout']}, "
                         f"args {json.dumps(c.family['args'])}")
    except VditError as e:
        lines.append(family_lines(cls_name, config) or f"contract    (export needs options: {e})")
        lines.append(f"export      refused: {e}" if "family " in lines[-1] else "")
    lines.append(f"weights     {len(files)} safetensors file(s), {params:,} parameters "
                 f"({sum(f.stat().st_size for f in files) / 1e9:.2f} GB)")
    return "\n".join(line for line in lines if line)


def family_lines(cls_name: str, config: dict) -> str:
    """What a known family is (layout, latent, conditioning, objective) when its export is refused."""
    from vdit_deploy import families

    try:
        family = families.by_class(cls_name)
        if family is None:
            return ""
        latent, cond = family.latent(config), family.cond(config)
    except (VditError, KeyError, TypeError, ValueError):
        return ""
    row = family.row()
    return (f"family      {family.name}: {row['objective']}, x_t (B, C, F, H, W), the model is fed {row['layout']}, "
            f"batch {row['batch']}, default sampler {row['sampler']}\n"
            f"latent      {list(latent)}  cond {'; '.join(map(str, cond))}")


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
        null[spec.name] = np.full(shape, value, spec.dtype)
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
    if not path.is_dir() or not (path / "config.json").is_file():
        raise VditError(f"{path} is not a model directory (a vdit checkpoint or a diffusers save_pretrained "
                        "directory, with config.json)")
    if is_diffusers_dir(path):
        return load_diffusers_source(path, device, **options)
    given = [k for k, val in options.items() if val not in (None, ())]
    if given:
        raise VditError(f"{path} is a vdit checkpoint: {', '.join(given)} are for diffusers models")
    return load_checkpoint_source(path, device)


def load_export_source(meta, export_dir, checkpoint=None, device: str = "cpu") -> Source:
    """The model an export was made from (`checkpoint`, default the path its metadata records), loaded
    with the export's contract and null conditioning, and refused when its weights differ (verify)."""
    from vdit_deploy.checkpoint import read_info
    from vdit_deploy.contract import load_null
    from vdit_deploy.files import sha256_files

    path = Path(checkpoint or meta.checkpoint_path or "")
    if not str(path) or not (path / "config.json").is_file():
        raise VditError(f"{export_dir}: its source model {str(path) or '(unknown)'} is not there; pass --checkpoint")

    contract = meta.contract
    if meta.model["class"] == BUILTIN:
        info = read_info(path)
        if {"class": BUILTIN, "config": info.model.to_dict()} != meta.model or info.schedule != contract.schedule:
            raise VditError(f"{export_dir}: the config or schedule in its metadata differs from {path}'s "
                            "config.json; re-export it")
    elif not is_diffusers_dir(path):
        raise VditError(f"{path} is not a diffusers model directory ({export_dir} was exported from one)")
    if sha256_files(model_files(path)) != meta.checkpoint_sha256:   # before loading it
        raise VditError(f"{path} is not the model {export_dir} was exported from (sha256 differs)")
    if meta.model["class"] == BUILTIN:
        source = load_checkpoint_source(path, device)
    else:
        source = load_diffusers_source(path, device, class_name=meta.model["class"], contract=contract)
    source.null = load_null(contract, Path(export_dir))
    source.contract = contract
    return source
