"""Calibration sets: the denoiser inputs a deployed sampler really produces, saved for every build.

Activations of a diffusion model change range along the trajectory (pure noise at t=T-1, a nearly
clean video at t=0), so INT8 ranges fitted on random noise or on one timestep clip the others. A
set is recorded by running the fp32 sampler the user deploys (sampler, steps, guidance) over
several seeds and the conditioning it serves (class labels, or rows of a --cond file: e.g. text
embeddings) and keeping the denoiser's inputs at `timesteps` steps spread evenly over the whole
trajectory, including the 2B cond + null batch that guidance feeds it.

    <dir>/x_t.npy   (N, C, F, H, W) float32      one row per video in a denoiser call
    <dir>/t.npy     (N,) float32
    <dir>/<name>.npy                             each conditioning input of the model contract, by
                                                 name (y.npy (N,) int32 for a class model;
                                                 encoder_hidden_states.npy (N, seq, D) for Latte):
                                                 the cond rows, then the null rows of guided calls
    <dir>/manifest.json                          checkpoint sha256, the contract (and its hash),
                                                 sampler, seeds, shapes, and per denoiser call its
                                                 rows and which of them are the null conditioning

The NAME.npy layout is also what runtimes/trt_network.calibration_batches reads (implicit INT8).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from vdit_deploy import validate as v
from vdit_deploy.config import check_memory
from vdit_deploy.contract import Contract
from vdit_deploy.samplers import DEFAULT_SAMPLER
from vdit_deploy.errors import VditError
from vdit_deploy.files import atomic_path, check_output, load_npy, read_json, save_npy
from vdit_deploy.sampling import conditioning, sampler_name, sampler_plan

FORMAT = "vdit-calibration/2"
MANIFEST = "manifest.json"
FIXED = ("x_t", "t")        # what every denoiser takes; the contract's conditioning inputs follow
DTYPES = {"x_t": np.float32, "t": np.float32}


def open_fp32(artifact):
    """A model directory (vdit checkpoint or diffusers) -> the torch runtime; an export dir or .onnx ->
    ONNX Runtime fp32. Returns (runtime, sha256 of the model's weights)."""
    from vdit_deploy.runtimes import open_runtime

    artifact = Path(artifact)
    if artifact.is_dir() and (artifact / "config.json").is_file():
        rt = open_runtime("torch", artifact)
        return rt, rt.source.sha256
    from vdit_deploy.export.metadata import find_onnx, read_metadata
    return open_runtime("ort", artifact), read_metadata(find_onnx(artifact)).checkpoint_sha256


def _timestep(t) -> int | float:
    """A record's timestep: the integer of a DDPM plan, sigma * T (a float) of a flow plan."""
    t = float(t)
    return int(t) if t.is_integer() else t


def pick_steps(num_steps: int, timesteps: int) -> list[int]:
    """`timesteps` step indices spread evenly from the first (t near T) to the last (t near 0)."""
    if not 1 <= timesteps <= num_steps:
        raise VditError(f"timesteps must be between 1 and the number of sampler steps ({num_steps}), got {timesteps}")
    return sorted({int(round(i)) for i in np.linspace(0, num_steps - 1, timesteps)})


def chunked(denoise, max_batch: int):
    """A denoise callable that splits calls larger than what a fixed-batch export takes."""
    def call(x, t, cond):
        if len(x) <= max_batch:
            return denoise(x, t, cond)
        return np.concatenate([denoise(x[i:i + max_batch], t[i:i + max_batch],
                                       {k: a[i:i + max_batch] for k, a in cond.items()})
                               for i in range(0, len(x), max_batch)])
    return call


def collect(checkpoint_or_export, out_dir, sampler: str | None = DEFAULT_SAMPLER, steps: int | None = None,
            guidance: float = 2.0, eta: float = 0.0, seeds=range(4), labels=None, timesteps: int = 8,
            progress: bool = False, order: int | None = None, spacing: str = "linspace", cond=None) -> Path:
    """Run the fp32 sampler (the one deployed: its timesteps are the ones INT8 ranges must cover) and
    record the denoiser inputs at `timesteps` steps of each trajectory. sampler None: the model's default; steps None: the sampler's
    default. labels: one class label per video of a sample (class models; default: every class once);
    cond: the conditioning instead, one row per video (a dict or a .safetensors file). Written atomically."""
    from vdit_deploy.sampling import DenoiseRecorder, sample

    seeds = [int(s) for s in seeds]
    if not seeds:
        raise VditError("collect needs at least one seed")
    out_dir = check_output(out_dir, is_dir=True, marker=MANIFEST)   # before sampling, not after
    v.number(guidance, "guidance", 0)
    v.number(eta, "eta", 0)
    rt, sha = open_fp32(checkpoint_or_export)
    with rt:
        contract = rt.contract
        served = conditioning(contract, labels, cond)
        videos = contract.batch_of(served)
        sampler = sampler_name(contract, sampler)                    # None: the model's own (a flow model's euler)
        plan = sampler_plan(contract, sampler, steps, eta, order, spacing)   # ddpm: all T; another count is refused
        keep = set(pick_steps(len(plan), timesteps))
        per_call = (2 if guidance != 1.0 else 1) * videos
        row_bytes = 4 * math.prod(contract.latent) + sum(a[:1].nbytes for a in served.values())
        n_rows = len(seeds) * len(keep) * per_call
        check_memory(n_rows * row_bytes, f"a calibration set of {n_rows} rows")
        denoise = chunked(rt.denoise, rt.batch_range[1])
        rows: dict[str, list[np.ndarray]] = {k: [] for k in (*FIXED, *contract.names)}
        records = []
        for seed in seeds:
            rec = DenoiseRecorder(denoise, keep)   # host-side guided step: one call per sampler step
            sample(rec, contract, served, plan, guidance, seed, progress=progress, null=rt.null)
            for index, x, t, call_cond, _ in rec.calls:
                start = sum(len(a) for a in rows["t"])
                for name, a in {"x_t": x, "t": t, **call_cond}.items():
                    rows[name].append(a)
                end = start + len(t)
                records.append({"seed": seed, "step": index, "t": _timestep(t[0]), "rows": [start, end],
                                "null_rows": [start + videos, end] if guidance != 1.0 else [end, end]})
    arrays = {name: np.concatenate(parts) for name, parts in rows.items()}
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise VditError(f"the sampler fed the denoiser NaN/inf ({name}): the model gives non-finite output; "
                            "no calibration set written")
    manifest = {
        "format": FORMAT, "checkpoint_sha256": sha, "contract": contract.to_dict(),
        "contract_sha256": contract.sha256(),
        "source": str(Path(checkpoint_or_export).resolve()), "runtime": f"{rt.name}:fp32",
        "sampler": sampler, "steps": len(plan), "order": order, "spacing": spacing, "eta": eta,
        "guidance": guidance, "seeds": seeds, "videos": videos,
        **({"labels": served[contract.label_input().name].tolist()} if contract.label_input() else {}),
        **({"cond_file": str(Path(cond).resolve())} if isinstance(cond, (str, Path)) else {}),
        "timesteps": sorted({r["t"] for r in records}, reverse=True),
        "step_indices": sorted(keep), "call_batch": per_call,
        "shapes": {k: list(a.shape) for k, a in arrays.items()}, "records": records,
    }
    with atomic_path(out_dir, is_dir=True, marker=MANIFEST) as tmp:
        for name, a in arrays.items():
            save_npy(tmp / f"{name}.npy", a, out_dir)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out_dir


class CalibrationSet:
    """A loaded set: arrays (N rows), the manifest, its contract, and batches in the denoiser's own call sizes."""

    def __init__(self, path: Path, manifest: dict, arrays: dict[str, np.ndarray], contract: Contract):
        self.path, self.manifest, self.arrays, self.contract = path, manifest, arrays, contract

    def __len__(self) -> int:
        return len(self.arrays["t"])

    @property
    def inputs(self) -> tuple:
        return (*FIXED, *self.contract.names)

    def rows(self, i: int, j: int) -> dict:
        return {k: self.arrays[k][i:j] for k in self.inputs}

    def batches(self, lo: int = 1, hi: int | None = None):
        """{x_t, t, *cond} dicts: one per recorded denoiser call, cut to at most `hi` rows; chunks under
        `lo` rows (a fixed-batch graph's ragged tail) are left out."""
        for r in self.manifest["records"]:
            start, end = r["rows"]
            step = hi or end - start
            for i in range(start, end, step):
                j = min(i + step, end)
                if j - i >= lo:
                    yield self.rows(i, j)

    def step_batches(self, lo: int = 1, hi: int | None = None, inputs=None):
        """Inputs of the fused step graph that make the same denoiser calls as batches(): x_t, t and the
        conditioning of each call's cond rows, null_<name> from its null rows (the graph rebuilds the 2B
        cond + null batch; an unguided set's cond stands in, guidance 1 ignores it), the manifest's
        guidance, the coefs of that step of the manifest's plan, seeded noise and a zero solver state
        (it only enters the step's float update); cut to at most `hi` videos. inputs: the names the
        graph takes (a step graph from before the multistep samplers has no state and 7 coefs)."""
        from vdit_deploy.samplers import SINGLE_STEP_COEFS
        from vdit_deploy.export.metadata import NULL_PREFIX, STEP_STATE

        m = self.manifest
        plan = sampler_plan(self.contract, m["sampler"], None if m["sampler"] == "ddpm" else m["steps"], m["eta"],
                            m.get("order"), m.get("spacing", "linspace"))
        single = inputs is not None and not {i for i, _ in STEP_STATE} <= set(inputs)
        for r in m["records"]:
            start, _ = r["rows"]
            null_start, null_end = r["null_rows"]
            cond_end = null_start if null_end > null_start else r["rows"][1]
            offset = null_start - start if null_end > null_start else 0   # null row of video i: i + offset
            coefs = plan[r["step"]].coefs
            step = hi or cond_end - start
            for i in range(start, cond_end, step):
                j = min(i + step, cond_end)
                if j - i >= lo:
                    feed = self.rows(i, j)
                    null = {NULL_PREFIX + k: self.arrays[k][i + offset:j + offset] for k in self.contract.names}
                    noise = np.random.default_rng([r["seed"], r["step"], i]).standard_normal(
                        feed["x_t"].shape, dtype=np.float32)
                    feed.update(null, guidance=np.float32([m["guidance"]]), coefs=coefs, noise=noise,
                                **{name: np.zeros_like(feed["x_t"]) for name, _ in STEP_STATE})
                    if single:
                        feed = {k: a for k, a in feed.items() if k in inputs}
                        feed["coefs"] = coefs[:SINGLE_STEP_COEFS]
                    yield feed


def onnx_session(path, threads: int | None = None):
    """A plain ONNX Runtime CPU session (all graph optimizations) for calibration and reports."""
    import onnxruntime as ort

    from vdit_deploy.threads import session_options

    options = session_options()             # --threads, or the default that fits the machine's load
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise VditError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}") from None


def run_onnx(path, cset: "CalibrationSet", threads: int | None = None) -> np.ndarray:
    """The denoiser output `out` for every row of the set from one .onnx file (in the graph's batch
    range), float32 (N, k*C, F, H, W): an eps+var model's variance channels included."""
    from vdit_deploy.export.metadata import read_metadata

    lo, hi = read_metadata(path).batch_range()
    session = onnx_session(path, threads)
    outs = [session.run(["out"], {k: np.ascontiguousarray(a) for k, a in b.items()})[0].astype(np.float32)
            for b in cset.batches(lo, hi)]
    return np.concatenate(outs)


def check_manifest(manifest, where: str) -> dict:
    """The manifest's schema: what load_calibration_set and the INT8 calibration read from it."""
    v.obj(manifest, "calibration manifest", required=("format",), where=where, extra_ok=True)
    if manifest["format"] == "vdit-calibration/1":
        v.fail(where, "recorded by an older vdit-deploy (no model contract, no conditioning by name): "
                      "collect it again with `vdit calibrate collect`")
    if manifest["format"] != FORMAT:
        v.fail(where, f"not a vdit calibration manifest (format {v.show(manifest['format'])}, expected {FORMAT!r})")
    v.obj(manifest, "calibration manifest", required=("format", "checkpoint_sha256", "contract", "contract_sha256",
                                                      "sampler", "steps", "eta", "guidance", "shapes", "records"),
          where=where, extra_ok=True)
    v.sha256_hex(manifest["checkpoint_sha256"], "checkpoint_sha256", where)
    v.sha256_hex(manifest["contract_sha256"], "contract_sha256", where)
    v.string(manifest["sampler"], "sampler", where=where)
    v.integer(manifest["steps"], "steps", 1, where=where)
    v.number(manifest["eta"], "eta", 0, where=where)
    v.number(manifest["guidance"], "guidance", 0, where=where)
    v.obj(manifest["shapes"], "shapes", required=FIXED, where=where, extra_ok=True)
    for name, shape in manifest["shapes"].items():
        v.int_list(shape, f"shapes.{name}", None, 0, where=where)
    rows = manifest["shapes"]["t"][0] if manifest["shapes"]["t"] else 0
    if not isinstance(manifest["records"], list):
        v.fail(where, "records must be a list")
    for r in manifest["records"]:
        v.obj(r, "a record", required=("seed", "step", "t", "rows", "null_rows"), where=where)
        v.integer(r["step"], "a record's step", 0, manifest["steps"] - 1, where)
        v.integer(r["seed"], "a record's seed", 0, where=where)
        start, end = v.int_list(r["rows"], "a record's rows", 2, 0, rows, where)
        null_start, null_end = v.int_list(r["null_rows"], "a record's null_rows", 2, 0, rows, where)
        if start >= end:
            v.fail(where, f"a record's rows must be [start, end) with start < end, got {r['rows']}")
        guided = null_end > null_start
        if not start <= null_start <= null_end == end or (guided and 2 * (null_start - start) != end - start):
            v.fail(where, f"a record's null_rows must be the second half of its rows or empty at its end, "
                          f"got {r['null_rows']} for rows {r['rows']}")
    return manifest


def load_calibration_set(path, expect_sha256: str | None = None,
                         expect_contract: Contract | None = None) -> CalibrationSet:
    """Load a set; refuse one made for another checkpoint (sha256) or model contract (conditioning,
    latent, output, schedule, null), and one whose manifest or arrays are malformed (schema, dtypes,
    shapes, NaN/inf, labels out of range)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise VditError(f"{path} is not a calibration set (no {MANIFEST}); run `vdit calibrate collect`")
    where = str(path / MANIFEST)
    manifest = read_json(path / MANIFEST, "calibration manifest", root=path)   # regular, bounded
    check_manifest(manifest, where)
    contract = Contract.from_dict(manifest["contract"], where)
    if contract.sha256() != manifest["contract_sha256"]:
        v.fail(where, "contract_sha256 does not match its contract (edited after it was collected)")
    if expect_sha256 and manifest["checkpoint_sha256"] != expect_sha256:
        raise VditError(f"calibration set {path} was recorded with checkpoint sha256:{manifest['checkpoint_sha256'][:12]}, "
                        f"not this model's sha256:{expect_sha256[:12]}; collect a new set for it")
    if expect_contract is not None and manifest["contract_sha256"] != expect_contract.sha256():
        raise VditError(f"calibration set {path} was recorded for another model contract (latent {contract.latent}, "
                        f"{contract.output}, conditioning {contract.describe_cond()}; this model: latent "
                        f"{expect_contract.latent}, {expect_contract.output}, {expect_contract.describe_cond()}); "
                        "collect a new set for it")
    shapes = manifest["shapes"]
    if set(shapes) != {*FIXED, *contract.names}:
        v.fail(where, f"shapes must name {', '.join((*FIXED, *contract.names))}, got {', '.join(shapes)}")
    n = shapes["t"][0] if len(shapes["t"]) == 1 else None
    expected = {"x_t": [n, *contract.latent], "t": [n]}
    arrays = {}
    for name in (*FIXED, *contract.names):
        file = path / f"{name}.npy"
        if not file.is_file():
            raise VditError(f"calibration set {path} lacks {file.name}")
        if name in expected and shapes[name] != expected[name]:
            raise VditError(f"{where}: shapes.{name} is {shapes[name]}, expected {expected[name]}")
        try:   # never unpickled, its header's shape checked before the array is read
            a = load_npy(file, path, shapes[name] if isinstance(shapes[name], list) else None)
        except (ValueError, OSError, EOFError) as e:
            raise VditError(f"{file} is not a readable .npy array (truncated, or holds objects): "
                            f"{str(e).splitlines()[0][:120] if str(e) else type(e).__name__}") from None
        dtype = DTYPES.get(name) or next(c.dtype for c in contract.cond if c.name == name)
        if a.dtype != dtype or list(a.shape) != shapes[name]:
            raise VditError(f"{file} is {a.dtype}{list(a.shape)}, the manifest says {np.dtype(dtype)}{shapes[name]}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise VditError(f"{file} holds NaN or inf values")
        arrays[name] = a
    # the conditioning against the contract: shapes, named axes in range, labels in 0..classes (null included)
    contract.check_cond({k: arrays[k] for k in contract.names}, n, f"calibration set {path}:")
    return CalibrationSet(path, manifest, arrays, contract)
