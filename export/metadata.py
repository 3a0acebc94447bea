"""What an export carries: everything a runtime needs to sample, stored in the ONNX metadata.

An export directory holds
    denoiser.onnx   (x_t, t, y) -> eps
    step.onnx       (x_t, t, y, guidance, coefs, noise, x0_prev, corr) -> x_prev, x0, corr_next:
                    one guided sampler step with the multistep solvers' state (STEP_STATE)
and later stages add precision variants beside them (denoiser.fp16.onnx, denoiser.int8.onnx, ...).
Each file's metadata_props hold the keys below as JSON strings. Torch-free: runtimes read this.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vdit_deploy.config import ModelConfig
from vdit_deploy.diffusion import COEF_NAMES, Schedule
from vdit_deploy.errors import VditError

DENOISER, STEP = "denoiser", "step"
KEYS = ("vdit.kind", "vdit.model_config", "vdit.schedule", "vdit.io", "vdit.checkpoint_sha256",
        "vdit.precision", "vdit.versions", "vdit.batch")


@dataclass(frozen=True)
class ExportMetadata:
    kind: str                      # "denoiser" | "step"
    config: ModelConfig
    schedule: Schedule
    io: dict                       # {"inputs": [{name, shape, dtype, layout}], "outputs": [...]}
    checkpoint_sha256: str
    precision: str = "fp32"        # fp32 | fp16 | int8-qdq | int8-dynamic
    versions: dict = field(default_factory=dict)   # torch, onnx, exporter, vdit-deploy
    batch: dict = field(default_factory=dict)      # {"min": 1, "max": 8} or {"fixed": 1}
    checkpoint_path: str = ""      # where it was exported from (optional: `vdit verify` defaults to it)

    def to_props(self) -> dict[str, str]:
        return {
            "vdit.kind": self.kind,
            "vdit.model_config": self.config.to_json(),
            "vdit.schedule": json.dumps(self.schedule.to_dict()),
            "vdit.io": json.dumps(self.io),
            "vdit.checkpoint_sha256": self.checkpoint_sha256,
            "vdit.precision": self.precision,
            "vdit.versions": json.dumps(self.versions, sort_keys=True),
            "vdit.batch": json.dumps(self.batch),
            **({"vdit.checkpoint": self.checkpoint_path} if self.checkpoint_path else {}),
        }

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> "ExportMetadata":
        missing = [k for k in KEYS if k not in props]
        if missing:
            raise VditError(f"{source} is not a vdit export (metadata lacks {', '.join(missing)})")
        try:
            return cls(kind=props["vdit.kind"],
                       config=ModelConfig.from_dict(json.loads(props["vdit.model_config"])),
                       schedule=Schedule(**json.loads(props["vdit.schedule"])),
                       io=json.loads(props["vdit.io"]),
                       checkpoint_sha256=props["vdit.checkpoint_sha256"],
                       precision=props["vdit.precision"],
                       versions=json.loads(props["vdit.versions"]),
                       batch=json.loads(props["vdit.batch"]),
                       checkpoint_path=props.get("vdit.checkpoint", ""))
        except (json.JSONDecodeError, TypeError) as e:
            raise VditError(f"{source}: vdit metadata is corrupt: {e}") from None

    def batch_range(self) -> tuple[int, int]:
        if "fixed" in self.batch:
            return self.batch["fixed"], self.batch["fixed"]
        return self.batch.get("min", 1), self.batch.get("max", 2 ** 31 - 1)


def read_metadata(path: str | Path) -> ExportMetadata:
    """Read the vdit metadata of one .onnx file without loading its weights."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise VditError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:   # onnx raises DecodeError, ValueError... for non-ONNX bytes
        raise VditError(f"{path} is not an ONNX model: {type(e).__name__}") from None
    return ExportMetadata.from_props({p.key: p.value for p in model.metadata_props}, str(path))


def find_onnx(path: str | Path, kind: str = DENOISER, precision: str = "fp32") -> Path:
    """An export directory or a file -> the .onnx file of that kind and precision."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise VditError(f"{path}: no such export directory or ONNX file")
    name = f"{kind}.onnx" if precision == "fp32" else f"{kind}.{precision}.onnx"
    if not (path / name).is_file():
        have = ", ".join(sorted(p.name for p in path.glob("*.onnx"))) or "no .onnx files"
        raise VditError(f"{path} has no {name} (it has {have}); run `vdit export` or `vdit calibrate` first")
    return path / name


def describe_onnx(path: str | Path) -> str:
    """Human-readable metadata of an .onnx file or of every .onnx file in an export directory."""
    path = Path(path)
    files = sorted(path.glob("*.onnx")) if path.is_dir() else [path]
    lines = []
    for file in files:
        meta = read_metadata(file)
        cfg = meta.config
        lines.append(f"{file}  ({file.stat().st_size / 1e6:.1f} MB, {meta.kind}, {meta.precision})")
        lines.append(f"  model      {cfg.to_json()}")
        lines.append(f"  schedule   {meta.schedule.kind}, T={meta.schedule.num_timesteps}")
        lines.append(f"  batch      {meta.batch}")
        for direction in ("inputs", "outputs"):
            for spec in meta.io.get(direction, []):
                lines.append(f"  {direction[:-1]:<10} {spec['name']}: {spec['dtype']}{spec['shape']}"
                             f"  {spec.get('layout', '')}")
        lines.append(f"  checkpoint sha256:{meta.checkpoint_sha256}")
        lines.append(f"  versions   {json.dumps(meta.versions, sort_keys=True)}")
        lines.append(f"  GFLOP/call {cfg.flops() / 1e9:.3f} at batch 1")
    return "\n".join(lines)


STEP_COEFS = COEF_NAMES   # the order of step.onnx's `coefs` input
# step.onnx's solver state: (input, the output the next step feeds into it). Graphs exported before the
# multistep solvers lack them (and take only the first 7 coefs): they run DDPM/DDIM only.
STEP_STATE = (("x0_prev", "x0"), ("corr", "corr_next"))
