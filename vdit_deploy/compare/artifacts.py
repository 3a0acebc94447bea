"""Which file each runtime loads, made on the spot from a checkpoint or taken as it is from an export.

From a model directory (a vdit checkpoint, or a diffusers save_pretrained directory exported with the
default options): exported, with the fp16/int8 variants the targets need, under OUT/artifacts/<sha>,
reused while the model's hash matches. From an export directory: used as it is (a missing
variant is the runtime's own skip reason). TensorRT targets get their engines built (or reused) here:
the runtime only loads them. Targets that cannot get an artifact are `skipped`, with the reason,
rather than failing the whole comparison."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vdit_deploy.errors import VditError
from vdit_deploy.export.variants import (DENOISER, DENOISER_HEAD, FP16, INT8_DYNAMIC, INT8_QDQ, find_variant, runtime_graph,
                                         variant_file)
from vdit_deploy.files import sha256_file, sha256_files

CALIBRATION_SEED_OFFSET = 1000                   # calibrate on other seeds than the ones evaluated


@dataclass(frozen=True)
class Target:
    """One column of the comparison: a runtime and the precision of the graph or engine it loads."""
    runtime: str       # a RUNTIMES name
    precision: str

    @property
    def label(self) -> str:
        return f"{self.runtime}:{self.precision}"


def parse_runtimes(text: str) -> list[Target]:
    """'ort:int8, torch' -> [Target("ort", "int8"), Target("torch", "fp32")], duplicates dropped."""
    from vdit_deploy.runtimes.base import check_runtime_name

    targets = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, precision = item.partition(":")
        target = Target(check_runtime_name(name), precision or "fp32")
        if target not in targets:
            targets.append(target)
    if not targets:
        raise VditError("--runtimes is empty; e.g. torch:fp32,ort:fp16")
    return targets


def model_sha256(path: Path) -> str | None:
    """The weights hash an export records for its source model (sources.py), without loading it or
    torch: a vdit checkpoint's model.safetensors; a diffusers directory's config.json and weights.
    None when `path` is neither."""
    if not (path / "config.json").is_file():
        return None
    if (path / "model.safetensors").is_file():
        return sha256_file(path / "model.safetensors")
    weights = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
    return sha256_files([path / "config.json", *weights]) if weights else None


def _export_covers(export_dir: Path, sha: str, max_batch: int, contract=None) -> bool:
    """Whether the cached export is of this model, takes the batches and (when known) has its contract:
    another --null or --seq is another export."""
    from vdit_deploy.export.metadata import read_metadata

    try:
        meta = read_metadata(export_dir / variant_file(DENOISER))
    except VditError:
        return False
    lo, hi = meta.batch_range()
    same_contract = contract is None or meta.contract.sha256() == contract.sha256()
    return meta.checkpoint_sha256 == sha and lo <= 1 and hi >= 2 * max_batch and same_contract


def _model_contract(source: Path, options: dict):
    """(contract, null) of a model directory from its config alone, or None without torch (the export
    that would need it says so)."""
    try:
        from vdit_deploy.sources import source_contract
    except ImportError:
        return None
    return source_contract(source, **options)


def _probe(target: Target) -> None:
    """Fail fast, with the runtime's own one-line reason, before building variants it could not run."""
    if target.runtime == "trt":
        from vdit_deploy.runtimes.engine_cache import gpu_info, import_tensorrt
        gpu_info()
        import_tensorrt()
    elif target.runtime == "ort-trt":
        from vdit_deploy.runtimes.ort_runtime import resolve_providers
        resolve_providers(["tensorrt", "cuda"])


class Artifacts:
    """Where each runtime's artifact lives; targets that cannot get one are `skipped` with the reason."""

    def __init__(self, source: Path, out: Path, targets: list[Target], batches: list[int], sampler: str,
                 steps: int, eta: float, guidance: float, seeds: list[int], log=print, cond=None,
                 model_options: dict | None = None, cache_split: int | None = None):
        """model_options: how a model directory is loaded and exported (null_file, seq: sources.load_source)."""
        from vdit_deploy.calibration.collect import conditioning
        from vdit_deploy.export.metadata import find_onnx, read_metadata

        self.log, self.cond, self.meta = log, cond, None
        self.pool = cond                 # the videos' conditioning rows, checked against the contract below
        self.model_options = {k: v for k, v in (model_options or {}).items() if v is not None}
        self.skipped: dict[Target, str] = {}
        sha = model_sha256(source) if source.is_dir() else None
        if sha is None and self.model_options:
            raise VditError(f"{', '.join(self.model_options)}: for a model directory; the export {source} carries "
                            "its own contract and null conditioning")
        if sha is not None:
            self.kind, self.checkpoint, self.sha = "checkpoint", source, sha
            self.export = out / "artifacts" / self.sha[:16]
            model = _model_contract(source, self.model_options)
            if model is not None:   # the conditioning rows and the null, checked before anything is exported
                contract, null = model
                self.pool = conditioning(contract, cond=cond)
                if guidance != 1.0:
                    contract.null_batch(null, self.pool)
            if all(t.runtime == "torch" for t in targets):
                pass                                   # nothing to export
            elif not _export_covers(self.export, self.sha, max(batches), model and model[0]) or (
                    cache_split and find_variant(self.export, DENOISER_HEAD) is None):
                try:
                    from vdit_deploy.export.onnx_export import export_checkpoint
                except ImportError:
                    raise VditError("comparing ONNX/TensorRT runtimes from a checkpoint exports it, which needs "
                                    "torch: pip install 'vdit-deploy[torch]', or pass an export directory") from None
                log(f"exporting {source} -> {self.export}")
                if self.export.is_dir():   # our stale cache (another batch range, --null or --seq): made anew
                    import shutil
                    shutil.rmtree(self.export)
                export_checkpoint(source, self.export, batch=(1, max(8, max(batches))), cache_split=cache_split,
                                  **self.model_options)
            else:
                log(f"reusing {self.export} (checkpoint sha256 {self.sha[:12]} matches)")
        else:
            self.kind, self.export = "export", source
            self.meta = meta = read_metadata(find_onnx(source))   # a one-line error when it is neither
            self.sha = meta.checkpoint_sha256
            ckpt = Path(meta.checkpoint_path) if meta.checkpoint_path else None
            ckpt_sha = model_sha256(ckpt) if ckpt is not None and ckpt.is_dir() else None
            if ckpt_sha is None:
                self.checkpoint, why = None, f"the export's source checkpoint {ckpt or '(not recorded)'} is not there"
            elif ckpt_sha != self.sha:
                self.checkpoint, why = None, f"{ckpt} has changed since the export (sha256 differs)"
            else:
                self.checkpoint, why = ckpt, ""
            if self.checkpoint is None:
                for t in targets:
                    if t.runtime == "torch":
                        self.skipped[t] = f"needs the checkpoint: {why}"
        if self.meta is None and (self.export / variant_file(DENOISER)).is_file():
            self.meta = read_metadata(self.export / variant_file(DENOISER))
        # the videos' conditioning rows, checked against the export's contract before anything runs (one line)
        if self.meta is not None:
            from vdit_deploy.contract import load_null

            contract = self.meta.contract
            self.pool = conditioning(contract, cond=cond)
            if guidance != 1.0:   # the prompt rows and the null conditioning guidance pairs them with
                contract.null_batch(load_null(contract, self.export), self.pool)
        # sampler None: the model's own (its scheduler config's: a flow model's), else the project's default
        from vdit_deploy.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS
        from vdit_deploy.sampling import sampler_name, sampler_plan

        contract = self.meta.contract if self.meta is not None else (model[0] if sha is not None and model else None)
        if contract is not None:
            sampler = sampler_name(contract, sampler)
            if steps is None and sampler != "ddpm":
                steps = len(sampler_plan(contract, sampler, None, eta))
        sampler = sampler or DEFAULT_SAMPLER
        steps = steps if steps is not None or sampler == "ddpm" else DEFAULT_STEPS.get(sampler)
        self.calib = dict(sampler=sampler, steps=steps, eta=eta, guidance=guidance,
                          seeds=[CALIBRATION_SEED_OFFSET + s for s in seeds[:2]])
        if self.kind == "checkpoint":
            for t in targets:
                if t not in self.skipped:
                    self._variant(t)
        for t in targets:
            if t.runtime == "trt" and t not in self.skipped:
                self._engines(t)

    def opener(self, target: Target, options: dict):
        """A callable that opens `target`'s runtime on its artifact. torch on an export's source model
        loads it with the export's contract and null conditioning (sources.load_export_source)."""
        from vdit_deploy.runtimes import open_runtime

        if target.runtime != "torch":
            return lambda: open_runtime(target.runtime, self.export, precision=target.precision, **options)
        if self.kind == "checkpoint":
            def from_model():
                from vdit_deploy.sources import load_source
                source = load_source(self.checkpoint, **self.model_options) if self.model_options else None
                return open_runtime("torch", self.checkpoint, precision=target.precision, source=source, **options)
            return from_model

        def from_export():
            from vdit_deploy.sources import load_export_source
            source = load_export_source(self.meta, self.export, self.checkpoint)
            return open_runtime("torch", self.checkpoint, precision=target.precision, source=source, **options)
        return from_export

    def _variant(self, target: Target) -> None:
        """Build the ONNX precision variant `target` reads (checkpoint sources only; cached by name)."""
        if target.runtime == "torch" or target.precision == "fp32":
            return
        try:
            _probe(target)
        except VditError as e:
            self.skipped[target] = str(e)
            return
        try:
            graph = runtime_graph(target.runtime, target.precision)
            if target.precision == "best" or find_variant(self.export, DENOISER, graph) is not None:
                return                               # best: what the export has (trt_network.onnx_for)
            if graph == FP16:
                from vdit_deploy.calibration.fp16 import convert_fp16
                self.log("converting to fp16")
                convert_fp16(self.export, self._calibration_set())   # refused if it makes inf/NaN
            elif graph in (INT8_DYNAMIC, INT8_QDQ):
                from vdit_deploy.calibration.int8 import MODES, quantize_int8
                mode = next(m for m, p in MODES.items() if p == graph)   # dynamic: ORT's fast CPU form
                self.log(f"quantizing to int8 ({mode})")
                quantize_int8(self.export, self._calibration_set(), mode=mode)
        except ImportError as e:
            self.skipped[target] = f"cannot build its {target.precision} graph: {e} (see `vdit calibrate`)"
        except VditError as e:
            self.skipped[target] = f"cannot build its {target.precision} graph: {e}"

    def _engines(self, target: Target) -> None:
        """Build (or find cached) the step and denoiser engines a trt target loads."""
        from vdit_deploy.runtimes.trt_build import KINDS, find_engine

        try:
            for kind in KINDS:
                find_engine(self.export, kind, target.precision, build=True, log=self.log)
        except VditError as e:
            self.skipped[target] = str(e)

    def _calibration_set(self) -> Path:
        """Activations from the same sampler settings as the comparison (other seeds), collected once."""
        c = self.calib
        tag = f"-cond{sha256_file(self.cond)[:8]}" if isinstance(self.cond, (str, Path)) else ""
        calib_dir = self.export / f"calib-{c['sampler']}{c['steps']}-g{c['guidance']:g}-eta{c['eta']:g}{tag}"
        if not calib_dir.is_dir():
            from vdit_deploy.calibration.collect import collect
            self.log(f"collecting a calibration set -> {calib_dir}")
            # from the model (PyTorch fp32), or from the export when it was made with options of its own (its null)
            source = self.checkpoint if self.kind == "checkpoint" and not self.model_options else self.export
            collect(source, calib_dir, sampler=c["sampler"],
                    steps=c["steps"], guidance=c["guidance"], eta=c["eta"], seeds=c["seeds"],
                    timesteps=min(8, c["steps"]), cond=self.cond)
        return calib_dir
