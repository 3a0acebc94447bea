"""Calibration sets: the denoiser inputs a deployed sampler really produces, saved for every build.

Activations of a diffusion model change range along the trajectory (pure noise at t=T-1, a nearly
clean video at t=0), so INT8 ranges fitted on random noise or on one timestep clip the others. A
set is recorded by running the fp32 sampler the user deploys (sampler, steps, guidance) over
several seeds and labels and keeping the denoiser's inputs at `timesteps` steps spread evenly over
the whole trajectory, including the 2B cond + null batch that guidance feeds it.

    <dir>/x_t.npy  (N, C, F, H, W) float32     one row per video in a denoiser call
    <dir>/t.npy    (N,) float32
    <dir>/y.npy    (N,) int32                  cond labels, then the null label for guided calls
    <dir>/manifest.json                        checkpoint sha256, model config, sampler, seeds, shapes

The NAME.npy layout is also what runtimes/trt_build.calibration_batches reads (implicit INT8).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from vdit_deploy.config import ModelConfig, check_memory
from vdit_deploy.diffusion import DEFAULT_SAMPLER
from vdit_deploy.errors import VditError
from vdit_deploy import validate as v
from vdit_deploy.files import atomic_path, check_output

FORMAT = "vdit-calibration/1"
MANIFEST = "manifest.json"
INPUTS = ("x_t", "t", "y")


def open_fp32(artifact):
    """A checkpoint dir -> the torch runtime; an export dir or .onnx -> ONNX Runtime fp32.
    Returns (runtime, checkpoint sha256)."""
    from vdit_deploy.runtimes import open_runtime

    artifact = Path(artifact)
    if artifact.is_dir() and (artifact / "config.json").is_file():
        from vdit_deploy.checkpoint import read_info
        return open_runtime("torch", artifact), read_info(artifact).sha256()
    from vdit_deploy.export.metadata import find_onnx, read_metadata
    return open_runtime("ort", artifact), read_metadata(find_onnx(artifact)).checkpoint_sha256


def pick_steps(num_steps: int, timesteps: int) -> list[int]:
    """`timesteps` step indices spread evenly from the first (t near T) to the last (t near 0)."""
    if not 1 <= timesteps <= num_steps:
        raise VditError(f"timesteps must be between 1 and the number of sampler steps ({num_steps}), got {timesteps}")
    return sorted({int(round(i)) for i in np.linspace(0, num_steps - 1, timesteps)})


def chunked(denoise, max_batch: int):
    """A denoise callable that splits calls larger than what a fixed-batch export takes."""
    def call(x, t, y):
        if len(x) <= max_batch:
            return denoise(x, t, y)
        return np.concatenate([denoise(x[i:i + max_batch], t[i:i + max_batch], y[i:i + max_batch])
                               for i in range(0, len(x), max_batch)])
    return call


def collect(checkpoint_or_export, out_dir, sampler: str = DEFAULT_SAMPLER, steps: int | None = None,
            guidance: float = 2.0, eta: float = 0.0, seeds=range(4), labels=None, timesteps: int = 8,
            progress: bool = False, order: int | None = None, spacing: str = "linspace") -> Path:
    """Run the fp32 sampler (the one deployed: its timesteps are the ones INT8 ranges must cover) and
    record the denoiser inputs at `timesteps` steps of each trajectory. steps None: the sampler's
    default. labels: one label per video of a sample (default: every class once). Written atomically."""
    from vdit_deploy.diffusion import make_steps
    from vdit_deploy.sampling import DenoiseRecorder, check_labels, sample

    seeds = [int(s) for s in seeds]
    if not seeds:
        raise VditError("collect needs at least one seed")
    out_dir = check_output(out_dir, is_dir=True, marker=MANIFEST)   # before sampling, not after
    v.number(guidance, "guidance", 0)
    v.number(eta, "eta", 0)
    rt, sha = open_fp32(checkpoint_or_export)
    with rt:
        cfg = rt.config
        y = check_labels(range(cfg.num_classes) if labels is None else labels, cfg)
        plan = make_steps(rt.schedule, sampler, steps, eta, order=order, spacing=spacing)   # ddpm: all T; another count is refused
        keep = set(pick_steps(len(plan), timesteps))
        rows = len(seeds) * len(keep) * (2 if guidance != 1.0 else 1) * len(y)
        check_memory(rows * 4 * math.prod(cfg.video_shape) + cfg.memory_bytes(2 * len(y)),
                     f"a calibration set of {rows} rows")
        denoise = chunked(rt.denoise, rt.batch_range[1])
        rows: dict[str, list[np.ndarray]] = {k: [] for k in INPUTS}
        records = []
        for seed in seeds:
            rec = DenoiseRecorder(denoise, keep)   # host-side guided step: one call per sampler step
            sample(rec, cfg, y, plan, guidance, seed, progress=progress)
            for index, x, t, yy, _ in rec.calls:
                start = sum(len(a) for a in rows["t"])
                for name, a in zip(INPUTS, (x, t, yy)):
                    rows[name].append(a)
                records.append({"seed": seed, "step": index, "t": int(t[0]), "rows": [start, start + len(t)]})
    arrays = {"x_t": np.concatenate(rows["x_t"]).astype(np.float32), "t": np.concatenate(rows["t"]).astype(np.float32),
              "y": np.concatenate(rows["y"]).astype(np.int32)}
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise VditError(f"the sampler fed the denoiser NaN/inf ({name}): the model gives non-finite output; "
                            "no calibration set written")
    manifest = {
        "format": FORMAT, "checkpoint_sha256": sha, "model_config": cfg.to_dict(),
        "source": str(Path(checkpoint_or_export).resolve()), "runtime": f"{rt.name}:fp32",
        "sampler": sampler, "steps": len(plan), "order": order, "spacing": spacing, "eta": eta,
        "guidance": guidance, "seeds": seeds,
        "labels": y.tolist(), "timesteps": sorted({r["t"] for r in records}, reverse=True),
        "step_indices": sorted(keep), "call_batch": (2 if guidance != 1.0 else 1) * len(y),
        "shapes": {k: list(a.shape) for k, a in arrays.items()}, "records": records,
    }
    with atomic_path(out_dir, is_dir=True, marker=MANIFEST) as tmp:
        for name, a in arrays.items():
            np.save(tmp / f"{name}.npy", a)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out_dir


class CalibrationSet:
    """A loaded set: arrays (N rows), the manifest, and batches in the denoiser's own call sizes."""

    def __init__(self, path: Path, manifest: dict, arrays: dict[str, np.ndarray]):
        self.path, self.manifest, self.arrays = path, manifest, arrays

    def __len__(self) -> int:
        return len(self.arrays["t"])

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["model_config"])

    def batches(self, lo: int = 1, hi: int | None = None):
        """{x_t, t, y} dicts: one per recorded denoiser call, cut to at most `hi` rows; chunks under
        `lo` rows (a fixed-batch graph's ragged tail) are left out."""
        for r in self.manifest["records"]:
            start, end = r["rows"]
            step = hi or end - start
            for i in range(start, end, step):
                j = min(i + step, end)
                if j - i >= lo:
                    yield {k: self.arrays[k][i:j] for k in INPUTS}

    def step_batches(self, schedule, lo: int = 1, hi: int | None = None, inputs=None):
        """Inputs of the fused step graph that make the same denoiser calls as batches(): x_t, t, y of
        each call's cond half (the graph rebuilds the 2B cond + null batch), the manifest's guidance,
        the coefs of that step of the manifest's plan, seeded noise and a zero solver state (it only
        enters the step's float update); cut to at most `hi` videos. inputs: the names the graph
        takes (a step graph from before the multistep samplers has no state and 7 coefs)."""
        from vdit_deploy.diffusion import SINGLE_STEP_COEFS, make_steps
        from vdit_deploy.export.metadata import STEP_STATE

        m = self.manifest
        plan = make_steps(schedule, m["sampler"], None if m["sampler"] == "ddpm" else m["steps"], m["eta"],
                          order=m.get("order"), spacing=m.get("spacing", "linspace"))
        single = inputs is not None and not {i for i, _ in STEP_STATE} <= set(inputs)
        guided = m["guidance"] != 1.0
        for r in m["records"]:
            start, end = r["rows"]
            cond_end = start + (end - start) // 2 if guided else end
            coefs = plan[r["step"]].coefs
            step = hi or cond_end - start
            for i in range(start, cond_end, step):
                j = min(i + step, cond_end)
                if j - i >= lo:
                    x = self.arrays["x_t"][i:j]
                    noise = np.random.default_rng([r["seed"], r["step"], i]).standard_normal(x.shape, dtype=np.float32)
                    feed = {"x_t": x, "t": self.arrays["t"][i:j], "y": self.arrays["y"][i:j],
                            "guidance": np.float32([m["guidance"]]), "coefs": coefs, "noise": noise,
                            **{name: np.zeros_like(x) for name, _ in STEP_STATE}}
                    if single:
                        feed = {k: v for k, v in feed.items() if k in inputs}
                        feed["coefs"] = coefs[:SINGLE_STEP_COEFS]
                    yield feed


def onnx_session(path, threads: int | None = None):
    """A plain ONNX Runtime CPU session (all graph optimizations) for calibration and reports."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise VditError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}") from None


def run_onnx(path, cset: "CalibrationSet", threads: int | None = None) -> np.ndarray:
    """eps for every row of the set from one .onnx file (in the graph's batch range), float32 (N, ...)."""
    from vdit_deploy.export.metadata import read_metadata

    lo, hi = read_metadata(path).batch_range()
    session = onnx_session(path, threads)
    outs = [session.run(None, {k: np.ascontiguousarray(v) for k, v in b.items()})[0].astype(np.float32)
            for b in cset.batches(lo, hi)]
    return np.concatenate(outs)


def check_manifest(manifest, where: str) -> dict:
    """The manifest's schema: what load_calibration_set and the INT8 calibration read from it."""
    v.obj(manifest, "calibration manifest", required=("format", "checkpoint_sha256", "model_config", "sampler",
                                                      "steps", "eta", "guidance", "shapes", "records"),
          where=where, extra_ok=True)
    if manifest["format"] != FORMAT:
        v.fail(where, f"not a vdit calibration manifest (format {v.show(manifest['format'])}, expected {FORMAT!r})")
    v.sha256_hex(manifest["checkpoint_sha256"], "checkpoint_sha256", where)
    v.string(manifest["sampler"], "sampler", where=where)
    v.integer(manifest["steps"], "steps", 1, where=where)
    v.number(manifest["eta"], "eta", 0, where=where)
    v.number(manifest["guidance"], "guidance", 0, where=where)
    v.obj(manifest["shapes"], "shapes", required=INPUTS, where=where)
    for name in INPUTS:
        v.int_list(manifest["shapes"][name], f"shapes.{name}", None, 0, where=where)
    rows = manifest["shapes"]["t"][0] if manifest["shapes"]["t"] else 0
    if not isinstance(manifest["records"], list):
        v.fail(where, "records must be a list")
    for r in manifest["records"]:
        v.obj(r, "a record", required=("seed", "step", "t", "rows"), where=where)
        v.integer(r["step"], "a record's step", 0, manifest["steps"] - 1, where)
        v.integer(r["seed"], "a record's seed", 0, where=where)
        start, end = v.int_list(r["rows"], "a record's rows", 2, 0, rows, where)
        if start >= end:
            v.fail(where, f"a record's rows must be [start, end) with start < end, got {r['rows']}")
    return manifest


DTYPES = {"x_t": np.float32, "t": np.float32, "y": np.int32}


def load_calibration_set(path, expect_sha256: str | None = None,
                         expect_config: ModelConfig | None = None) -> CalibrationSet:
    """Load a set; refuse one made for another checkpoint (sha256) or model shape (config), and one
    whose manifest or arrays are malformed (schema, dtypes, shapes, NaN/inf)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise VditError(f"{path} is not a calibration set (no {MANIFEST}); run `vdit calibrate collect`")
    where = str(path / MANIFEST)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (ValueError, RecursionError) as e:
        raise VditError(f"{where} is corrupt: {str(e)[:200]}") from None
    check_manifest(manifest, where)
    config = ModelConfig.from_dict(manifest["model_config"], where)
    if expect_sha256 and manifest["checkpoint_sha256"] != expect_sha256:
        raise VditError(f"calibration set {path} was recorded with checkpoint sha256:{manifest['checkpoint_sha256'][:12]}, "
                        f"not this model's sha256:{expect_sha256[:12]}; collect a new set for it")
    if expect_config is not None and config != expect_config:
        raise VditError(f"calibration set {path} was recorded for another model shape "
                        f"(video {config.video_shape}, expected {expect_config.video_shape}); "
                        "collect a new set for it")
    shapes = manifest["shapes"]
    n = shapes["t"][0] if len(shapes["t"]) == 1 else None
    expected = {"x_t": [n, *config.video_shape], "t": [n], "y": [n]}
    arrays = {}
    for name in INPUTS:
        file = path / f"{name}.npy"
        if not file.is_file():
            raise VditError(f"calibration set {path} lacks {file.name}")
        if shapes[name] != expected[name]:
            raise VditError(f"{where}: shapes.{name} is {shapes[name]}, expected {expected[name]}")
        try:
            a = np.load(file, allow_pickle=False)   # never unpickle
        except (ValueError, OSError, EOFError) as e:
            raise VditError(f"{file} is not a readable .npy array (truncated, or holds objects): "
                            f"{str(e).splitlines()[0][:120] if str(e) else type(e).__name__}") from None
        if a.dtype != DTYPES[name] or list(a.shape) != shapes[name]:
            raise VditError(f"{file} is {a.dtype}{list(a.shape)}, the manifest says "
                            f"{np.dtype(DTYPES[name])}{shapes[name]}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise VditError(f"{file} holds NaN or inf values")
        arrays[name] = a
    if not ((arrays["y"] >= 0) & (arrays["y"] <= config.null_label)).all():
        raise VditError(f"{path / 'y.npy'} holds labels outside 0..{config.null_label}")
    return CalibrationSet(path, manifest, arrays)
