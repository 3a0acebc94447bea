"""What an export carries: everything a runtime needs to sample, stored in the ONNX metadata.

An export directory holds
    denoiser.onnx          (x_t, t, *cond) -> out
    step.onnx              (x_t, t, *cond, *null_cond, guidance, coefs, noise, x0_prev, corr)
                           -> x_prev, x0, corr_next: one guided sampler step with the multistep
                           solvers' state (STEP_STATE)
    null_cond.safetensors  the null conditioning guidance pairs with the prompt (contract.py)
and later stages add precision variants beside them (named in variants.py: denoiser.fp16.onnx, ...).
Each file's metadata_props hold the keys below as JSON strings. Torch-free: runtimes read this.
The model contract (vdit.contract: conditioning inputs, output kind, latent shape, schedule, null
conditioning hash) is what every stage reads; vdit.model names the architecture and its own config.

Metadata is checked before use: every field against its schema (vdit_deploy/validate.py), the
`vdit.digest` checksum of the fields that decide what a sample is (kind, contract, model, I/O, batch,
checkpoint hash) against their content, so a hand-edited schedule or frame count is refused rather
than sampled (a checksum, not a signature: it has no key, so it stops accidents, not an attacker who
recomputes it; what metadata can do is bounded instead: it never names code to import, its sizes are
checked and its external data must lie beside the graph), the video shape against the graph's own input, and, when a directory is opened,
every graph in it against the others (one checkpoint, contract and model).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from vdit_deploy import validate as v
from vdit_deploy.config import ModelConfig
from vdit_deploy.contract import BUILTIN, NULL_FILE, Contract
from vdit_deploy.schedules import Schedule
from vdit_deploy.errors import VditError
from vdit_deploy.export.graph_files import check_external_data
from vdit_deploy.export.variants import (DECODER_KINDS, DENOISER, FP16, GRAPH_PRECISIONS, INT8_QDQ, KINDS, OLD_TAGS,
                                         TEXT_ENCODER, STEP, all_variant_files, find_variant, graph_precision, variant_file,
                                         variant_files)

# What a sample depends on: a digest of these catches edits. The precision tag is left out (variants
# restamp it) and checked against the file name instead.
DIGESTED = ("vdit.kind", "vdit.contract", "vdit.model", "vdit.io", "vdit.checkpoint_sha256", "vdit.batch")
KEYS = (*DIGESTED, "vdit.precision", "vdit.versions", "vdit.digest")
OPTIONAL_DIGESTED = ("vdit.cache",)   # a step-caching graph's split (export/cache_export.py), digested when there


class NotVditGraph(VditError):
    """The file is not a vdit graph at all (not ONNX, or no vdit metadata): others may live beside ours."""


def digest(props: dict[str, str]) -> str:
    keys = (*DIGESTED, *(k for k in OPTIONAL_DIGESTED if k in props))
    return hashlib.sha256("\n".join(f"{k}={props[k]}" for k in keys).encode()).hexdigest()


@dataclass(frozen=True)
class ExportMetadata:
    kind: str                      # "denoiser" | "step"
    contract: Contract
    model: dict                    # {"class": "module:Class", "config": {the architecture's own config}}
    io: dict                       # {"inputs": [{name, shape, dtype, layout}], "outputs": [...]}
    checkpoint_sha256: str
    precision: str = "fp32"        # a GRAPH_PRECISIONS tag (variants.py); older tags are read as today's
    versions: dict = field(default_factory=dict)   # torch, onnx, exporter, vdit-deploy
    batch: dict = field(default_factory=dict)      # {"min": 1, "max": 8} or {"fixed": 1}
    checkpoint_path: str = ""      # where it was exported from (optional: `vdit verify` defaults to it)
    cache: dict = field(default_factory=dict)      # a cache graph's split: {"blocks", "depth", "ctx", ...}

    def to_props(self) -> dict[str, str]:
        props = {
            "vdit.kind": self.kind,
            "vdit.contract": json.dumps(self.contract.to_dict(), sort_keys=True),
            "vdit.model": json.dumps(self.model, sort_keys=True),
            "vdit.io": json.dumps(self.io),
            "vdit.checkpoint_sha256": self.checkpoint_sha256,
            "vdit.precision": self.precision,
            "vdit.versions": json.dumps(self.versions, sort_keys=True),
            "vdit.batch": json.dumps(self.batch),
            **({"vdit.checkpoint": self.checkpoint_path} if self.checkpoint_path else {}),
            **({"vdit.cache": json.dumps(self.cache, sort_keys=True)} if self.cache else {}),
        }
        return {**props, "vdit.digest": digest(props)}

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> "ExportMetadata":
        missing = [k for k in KEYS if k not in props]
        if missing and "vdit.kind" in props and "vdit.contract" in missing:
            raise VditError(f"{source} was exported by an older vdit-deploy (its metadata has no model contract): "
                            "re-export it with `vdit export`")
        if missing:
            hint = "; it was exported by an older vdit-deploy: re-export" if missing == ["vdit.digest"] else ""
            raise NotVditGraph(f"{source} is not a vdit export (metadata lacks {', '.join(missing)}){hint}")
        if props["vdit.digest"] != digest(props):
            raise VditError(f"{source}: its vdit metadata was edited after export (the checksum of kind, contract, "
                            "model, I/O, batch and checkpoint hash does not match); re-export it")
        where = f"{source} metadata"

        def parsed(key):
            try:
                return json.loads(props[key])
            except (ValueError, RecursionError) as e:
                raise VditError(f"{where}: {key} is not valid JSON: {str(e)[:100]}") from None

        io, batch, versions = parsed("vdit.io"), parsed("vdit.batch"), parsed("vdit.versions")
        model = parsed("vdit.model")
        v.obj(model, "vdit.model", required=("class", "config"), where=where)
        v.string(model["class"], "vdit.model class", where=where)
        v.obj(model["config"], "vdit.model config", where=where, extra_ok=True)
        if model["class"] == BUILTIN:
            ModelConfig.from_dict(model["config"], where)
        v.obj(io, "vdit.io", required=("inputs", "outputs"), where=where)
        for direction in ("inputs", "outputs"):
            if not isinstance(io[direction], list):
                v.fail(where, f"vdit.io {direction} must be a list")
            for spec in io[direction]:
                v.obj(spec, f"a vdit.io {direction[:-1]}", required=("name", "shape", "dtype"), optional=("layout",),
                      where=where)
                v.string(spec["name"], "an I/O name", where=where)
                v.string(spec["dtype"], "an I/O dtype", where=where)
                if not isinstance(spec["shape"], list):
                    v.fail(where, f"the shape of {spec['name']} must be a list")
        v.obj(versions, "vdit.versions", where=where, extra_ok=True)
        cache = parsed("vdit.cache") if "vdit.cache" in props else {}
        if cache:
            check_cache_meta(cache, where)
        return cls(kind=v.string(props["vdit.kind"], "vdit.kind", KINDS, where),
                   contract=Contract.from_dict(parsed("vdit.contract"), where), model=model, io=io,
                   checkpoint_sha256=v.sha256_hex(props["vdit.checkpoint_sha256"], "vdit.checkpoint_sha256", where),
                   precision=graph_precision(v.string(props["vdit.precision"], "vdit.precision",
                                                     (*GRAPH_PRECISIONS, *OLD_TAGS), where)),
                   versions=versions, batch=check_batch(batch, where),
                   checkpoint_path=props.get("vdit.checkpoint", ""), cache=cache)

    @property
    def schedule(self) -> Schedule:
        return self.contract.schedule

    @property
    def config(self) -> ModelConfig | None:
        """The built-in model's config (FLOPs, memory plans); None for another architecture."""
        return ModelConfig.from_dict(self.model["config"]) if self.model["class"] == BUILTIN else None

    def batch_range(self) -> tuple[int, int]:
        if "fixed" in self.batch:
            return self.batch["fixed"], self.batch["fixed"]
        return self.batch.get("min", 1), self.batch.get("max", 2 ** 31 - 1)


def check_batch(batch, where: str) -> dict:
    """vdit.batch: {"min": lo, "max": hi} with 1 <= lo <= hi, or {"fixed": n}."""
    if isinstance(batch, dict) and "fixed" in batch:
        v.obj(batch, "vdit.batch", required=("fixed",), where=where)
        v.integer(batch["fixed"], "fixed batch", 1, v.INT32_MAX, where)
        return batch
    v.obj(batch, "vdit.batch", required=("min", "max"), where=where)
    lo = v.integer(batch["min"], "batch min", 1, v.INT32_MAX, where)
    v.integer(batch["max"], "batch max", lo, v.INT32_MAX, where)
    return batch


def stamp(model, changes: dict[str, str]) -> None:
    """Set metadata props of an onnx ModelProto (a precision variant's tag, a test's edit) and
    recompute the checksum: the one sanctioned way to change an export's metadata. The checksum has no
    key (anyone can recompute it): it catches accidental edits, not deliberate ones (README: Security model)."""
    props = {p.key: p.value for p in model.metadata_props}
    props.update(changes)
    if all(k in props for k in DIGESTED):
        props["vdit.digest"] = digest(props)
    del model.metadata_props[:]
    for k, value in props.items():
        model.metadata_props.add(key=k, value=value)


_CACHE: dict[tuple, ExportMetadata] = {}


def read_metadata(path: str | Path) -> ExportMetadata:
    """Read and check the vdit metadata of one .onnx file without loading its external weights: the
    schema, the digest, and the video shape and class count against the graph's own x_t input and
    label table (the built-in model's)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise VditError(f"{path}: no such ONNX file")
    data = path.with_name(path.name + ".data")
    key = tuple((str(p.resolve()), p.lstat().st_mtime_ns, p.lstat().st_size) if p.exists() or p.is_symlink() else ()
                for p in (path, data))
    if key in _CACHE:
        return _CACHE[key]
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:   # onnx raises DecodeError, ValueError... for non-ONNX bytes
        raise NotVditGraph(f"{path} is not an ONNX model: {type(e).__name__}") from None
    meta = ExportMetadata.from_props({p.key: p.value for p in model.metadata_props}, str(path))
    check_external_data(model, path)     # before any command loads or copies it (graph_files.py)
    x_t = next((i for i in model.graph.input if i.name == "x_t"), None)
    if x_t is not None:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in x_t.type.tensor_type.shape.dim]
        if dims[1:] != list(meta.contract.latent):
            raise VditError(f"{path}: the graph takes x_t of shape {dims[1:]} per video, its metadata says "
                            f"{list(meta.contract.latent)}; the metadata does not belong to this graph")
    cfg = meta.config
    table = next((i for i in model.graph.initializer if i.name.endswith("y_embedder.weight")), None)
    if cfg is not None and table is not None and table.dims[0] != cfg.num_classes + 1:   # labels and the null label
        raise VditError(f"{path}: the graph's label table has {table.dims[0]} rows, its metadata says "
                        f"num_classes={cfg.num_classes} (+1 null); the metadata does not belong to this graph")
    _CACHE[key] = meta
    return meta


def check_export_dir(path: str | Path, skipped: list[str] | None = None) -> dict[Path, ExportMetadata]:
    """Every vdit graph of an export directory -> its metadata, refusing a directory whose graphs come
    from different checkpoints, configs or schedules, or whose file names contradict their metadata
    (denoiser.fp16.onnx must be an fp16 denoiser). Other .onnx files (names vdit does not give, or no
    vdit graph at all) are passed over, the reason appended to `skipped`; a graph under one of vdit's
    names whose metadata is edited or corrupt is refused."""
    path = Path(path)
    metas = {}
    ours = all_variant_files()
    decoders = all_variant_files((*DECODER_KINDS, TEXT_ENCODER))   # the VAE's and text encoder's: other models
    for file in sorted(path.glob("*.onnx")):
        if file.name in decoders:
            continue
        if file.name not in ours:
            if skipped is not None:
                skipped.append(f"{file.name}: not a file name vdit gives a graph ({', '.join(sorted(ours))})")
            continue
        try:
            meta = read_metadata(file)
        except NotVditGraph as e:
            if skipped is not None:
                skipped.append(str(e))
            continue
        if file.name not in variant_files(meta.kind, meta.precision):
            raise VditError(f"{file} holds a {meta.precision} {meta.kind} graph, which would be named "
                            f"{variant_file(meta.kind, meta.precision)}; rename or remove it")
        metas[file] = meta
    if metas:
        first_file, first = next(iter(metas.items()))
        for file, meta in metas.items():
            for what, a, b in (("checkpoint", meta.checkpoint_sha256, first.checkpoint_sha256),
                               ("model", meta.model, first.model), ("contract", meta.contract, first.contract)):
                if a != b:
                    raise VditError(f"{file.name} and {first_file.name} in {path} come from a different {what}; "
                                    f"an export directory holds the graphs of one export (re-export it)")
    return metas


def check_variant_complete(export_dir: Path, precision: str) -> None:
    """An fp16 or int8-qdq variant is both graphs or neither (calibration/fp16.publish_files): a
    denoiser.fp16.onnx without step.fp16.onnx beside a step.onnx would silently sample with the host-side step."""
    export_dir = Path(export_dir)
    if precision in (FP16, INT8_QDQ) and (export_dir / variant_file(STEP)).is_file() and \
            find_variant(export_dir, DENOISER, precision) and not find_variant(export_dir, STEP, precision):
        again = "`vdit calibrate " + ("fp16`" if precision == FP16 else "int8 --mode qdq`")
        raise VditError(f"{export_dir} has {variant_file(DENOISER, precision)} without {variant_file(STEP, precision)} "
                        f"(from an interrupted or older {again}): run {again} again")


def find_onnx(path: str | Path, kind: str = DENOISER, precision: str = "fp32") -> Path:
    """An export directory or a file -> the .onnx file of that kind and precision."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise VditError(f"{path}: no such export directory or ONNX file")
    check_export_dir(path)
    found = find_variant(path, kind, precision)
    if found is None:
        have = ", ".join(sorted(p.name for p in path.glob("*.onnx"))) or "no .onnx files"
        raise VditError(f"{path} has no {variant_file(kind, precision)} (it has {have}); run `vdit export` or "
                        "`vdit calibrate` first")
    return found


def export_own_files(out: str | Path, refuse: bool = True) -> list[str]:
    """Before exporting into `out`: it must be writable, and, when it holds an export, the names of
    what else it holds. Re-exporting replaces the whole directory, so fp16/int8 variants, engines or
    calibration sets kept there (made from the old graphs) would silently go: with `refuse`, name them
    in a one-line error instead."""
    from vdit_deploy.files import check_output, remove_dead_temporaries

    out = check_output(out, is_dir=True, marker=variant_file(DENOISER))
    remove_dead_temporaries(out)      # a killed `calibrate` leaves its temporaries: not the user's files
    if not (out / variant_file(DENOISER)).is_file():
        return []
    own = {variant_file(k) for k in KINDS} | {variant_file(k) + ".data" for k in KINDS} | {NULL_FILE}
    others = sorted(p.name for p in out.iterdir() if p.name not in own)
    if others and refuse:
        raise VditError(f"{out} also holds {', '.join(others[:4])}{' ...' if len(others) > 4 else ''}, "
                        "made from the graphs a new export replaces; move or delete them, or export to "
                        "another --out")
    return others


def describe_onnx(path: str | Path) -> str:
    """Human-readable metadata of an .onnx file or of every .onnx file in an export directory."""
    path = Path(path)
    files = sorted(path.glob("*.onnx")) if path.is_dir() else [path]
    lines = []
    for file in files:
        if file.name in all_variant_files(DECODER_KINDS):      # the VAE's: decode.describe_decoder (vdit info)
            continue
        meta = read_metadata(file)
        cfg, contract = meta.config, meta.contract
        lines.append(f"{file}  ({file.stat().st_size / 1e6:.1f} MB, {meta.kind}, {meta.precision})")
        lines.append(f"  model      {meta.model['class']} {json.dumps(meta.model['config'], sort_keys=True)[:300]}")
        lines.append(f"  contract   latent {list(contract.latent)}, output {contract.output}, "
                     f"cond {contract.describe_cond()}")
        lines.append(f"  schedule   {json.dumps(meta.schedule.to_dict())}")
        from vdit_deploy.sampling import describe_sampling

        lines += [f"  {line}" for line in describe_sampling(contract).splitlines()]
        if contract.family:   # the adapter every stage rebuilds (vdit_deploy/families/)
            lines.append(f"  family     {contract.family['name']}: x_t (B, C, F, H, W), the model is fed "
                         f"{contract.family['layout']}; args {json.dumps(contract.family['args'])}")
        lines.append(f"  batch      {meta.batch}")
        for direction in ("inputs", "outputs"):
            for spec in meta.io.get(direction, []):
                lines.append(f"  {direction[:-1]:<10} {spec['name']}: {spec['dtype']}{spec['shape']}"
                             f"  {spec.get('layout', '')}")
        lines.append(f"  checkpoint sha256:{meta.checkpoint_sha256}")
        lines.append(f"  versions   {json.dumps(meta.versions, sort_keys=True)}")
        if cfg is not None:
            lines.append(f"  GFLOP/call {cfg.flops() / 1e9:.3f} at batch 1")
    return "\n".join(lines)


# step.onnx's solver state: (input, the output the next step feeds into it).
STEP_STATE = (("x0_prev", "x0"), ("corr", "corr_next"))
NULL_PREFIX = "null_"      # step.onnx's null conditioning inputs: null_<name> for each conditioning input


def check_cache_meta(cache, where: str) -> dict:
    v.obj(cache, "vdit.cache", required=("blocks", "depth", "ctx", "error"), where=where, extra_ok=True)
    depth = v.integer(cache["depth"], "cache depth", 2, where=where)
    v.integer(cache["blocks"], "cache blocks", 1, depth - 1, where)
    if not isinstance(cache["ctx"], list) or not all(isinstance(c, str) and c.isidentifier() for c in cache["ctx"]):
        v.fail(where, "vdit.cache ctx must be a list of names")
    v.number(cache["error"], "cache error", 0, where=where)
    return cache
