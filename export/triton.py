"""An NVIDIA Triton Inference Server model repository for an export: `vdit serve-export EXPORT --triton DIR`.

    DIR/vdit_denoiser/config.pbtxt   the denoiser with dynamic batching, on one of BACKENDS:
    DIR/vdit_denoiser/1/model.onnx     onnxruntime (Triton's ONNX Runtime backend), tensorrt (model.plan,
                                       a `vdit build` engine: --engine), or python (model.py running vdit's
                                       ONNX Runtime runtime in-process: the server `vdit serve` starts)
    DIR/vdit_sampler/config.pbtxt    every sampler's loop as a Python-backend model
    DIR/vdit_sampler/1/model.py      calls the denoiser once per step through BLS
    DIR/vdit_sampler/1/null_cond.safetensors   the export's null conditioning (guidance's other half)
    DIR/vdit_sampler/1/decoder.onnx  where the export has the VAE decoder (`vdit export-decoder`, + decoder-chunk.onnx):
                                       the sampler's optional output `frames` (B, 3, F', H', W') in [-1, 1],
                                       decoded in the sampler's process (ONNX Runtime) when a request asks for it

One sampler request (the model contract's conditioning, each input by its name: `y` labels for the
built-in model, `encoder_hidden_states` (B, L, D) text embeddings for a Latte; optional seed, sampler,
steps, order, eta, guidance: triton_python.REQUEST_OPTIONS) runs a whole sampling loop; the loop pairs the
request's conditioning with the null conditioning it read from null_cond.safetensors beside model.py, so a
client never sends it. The denoiser calls of concurrent requests are batched together by Triton's dynamic
batcher (requests whose named axes, e.g. the token count, are equal), so throughput grows with load and
the denoiser model can have instances on many GPUs. The Python models are vdit_deploy's
(export/triton_python.py: the same noise for the same seed as `vdit sample`), so the server's Python needs
`pip install vdit-deploy`. Nothing here imports tritonclient or torch; tests validate the configs against
Triton's protobuf schema and run the python repository on a live server (tests/test_serve_live.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from vdit_deploy.contract import NULL_FILE, Contract, load_null
from vdit_deploy.errors import VditError
from vdit_deploy.export.triton_python import REQUEST_OPTIONS, model_py
from vdit_deploy.export.variants import with_data
from vdit_deploy.files import atomic_path, check_inside
from vdit_deploy.runtimes.qdq_bins import float_note

DENOISER_MODEL, SAMPLER_MODEL = "vdit_denoiser", "vdit_sampler"
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
                 "bool": "TYPE_BOOL"}
MAX_QUEUE_DELAY_US = 2000   # how long a denoiser call may wait for others to batch with
# the denoiser's Triton backend -> its config line; python: vdit's ONNX Runtime runtime in a Python model,
# what the tritonserver nvidia-pytriton ships can run (it has no ONNX Runtime or TensorRT backend)
BACKENDS = {"onnxruntime": 'platform: "onnxruntime_onnx"', "tensorrt": 'platform: "tensorrt_plan"',
            "python": 'backend: "python"'}
SAMPLER_INSTANCES = 8       # concurrent sampling loops per server: the calls the dynamic batcher can merge
FIXED_BATCH_VIDEOS = 8      # videos per request on a fixed-batch export: its guided calls run one after another


# ---- config.pbtxt ---------------------------------------------------------------------------------
def _dims(shape) -> list[int]:
    """Per-sample dims: sizes, and -1 for a named (variable) axis such as the token count."""
    return [d if isinstance(d, int) else -1 for d in shape]


def _tensor(spec: dict, fixed: int | None = None) -> str:
    """An export io spec {name, shape, dtype} -> a Triton input/output entry. With batching Triton owns
    axis 0; a per-sample scalar (shape [batch]) is sent as [batch, 1] and reshaped to [batch]. fixed: a
    fixed-batch denoiser (no batching, max_batch_size 0): the batch axis is written out."""
    if spec["dtype"] not in TRITON_DTYPES:
        raise VditError(f"tensor {spec['name']}: dtype {spec['dtype']} has no Triton type here")
    dims = _dims(spec["shape"][1:])
    reshape = ""
    if not dims:
        dims, reshape = [1], " reshape: { shape: [ ] }"
    if fixed is not None:
        dims, reshape = [fixed, *dims], reshape and f" reshape: {{ shape: [ {fixed} ] }}"
    return (f'  {{ name: "{spec["name"]}" data_type: {TRITON_DTYPES[spec["dtype"]]} '
            f'dims: [ {", ".join(map(str, dims))} ]{reshape} }}')


def _param(key: str, value: str) -> str:
    # json.dumps of an ASCII str is a valid protobuf text-format string literal (\" and \\ escapes)
    return f"parameters {{ key: {json.dumps(key)} value: {{ string_value: {json.dumps(value)} }} }}"


def denoiser_config(io: dict, backend: str, max_batch: int, instances: int, fixed: int | None = None) -> str:
    """fixed: the batch of a fixed-batch export (LTX-Video, Mochi): Triton then has nothing to batch and
    every call carries exactly that many rows (the sampler splits its guided calls to it)."""
    # AUTO: a GPU if there is one; the python model runs ONNX Runtime's CPU provider in its own process
    kind = {"tensorrt": "KIND_GPU", "python": "KIND_CPU"}.get(backend, "KIND_AUTO")
    batching = ["dynamic_batching {", f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}", "}"]
    return "\n".join([
        f'name: "{DENOISER_MODEL}"',
        BACKENDS[backend],
        f"max_batch_size: {0 if fixed else max_batch}" + (f"   # a fixed batch of {fixed}: no batching" if fixed else ""),
        "input [", ",\n".join(_tensor(s, fixed) for s in io["inputs"]), "]",
        "output [", ",\n".join(_tensor(s, fixed) for s in io["outputs"]), "]",
        *([] if fixed else batching),
        f"instance_group [ {{ count: {instances} kind: {kind} }} ]",
        ""])


def sampler_config(meta, max_videos: int, instances: int, frames: tuple | None = None) -> str:
    """frames: the decoded video's per-video shape (3, F', H', W') where the repository has a decoder.
    A fixed-batch export's sampler calls the denoiser in calls of exactly that batch (denoiser_rows)."""
    contract = meta.contract
    cond = [f'  {{ name: "{c.name}" data_type: {TRITON_DTYPES[c.dtype]} dims: [ {", ".join(map(str, _dims(c.shape)))} ] }}'
            for c in contract.cond]
    options = [f'  {{ name: "{name}" data_type: {dtype} dims: [ 1 ] optional: true }}'
               for name, dtype in REQUEST_OPTIONS.items()]
    return "\n".join([
        f'name: "{SAMPLER_MODEL}"',
        'backend: "python"',
        "max_batch_size: 0   # one request = one sampling job; batching happens at the denoiser",
        f"# the conditioning: {contract.describe_cond()} (one row per video)",
        "input [", ",\n".join(cond + options), "]",
        "output [",
        f'  {{ name: "video" data_type: TYPE_FP32 dims: [ -1, {", ".join(map(str, contract.latent))} ] }}'
        + ("" if frames is None else
           f',\n  {{ name: "frames" data_type: TYPE_FP32 dims: [ -1, {", ".join(map(str, frames))} ] }}'),
        "]",
        "# concurrent sampling loops: their denoiser calls are what the dynamic batcher batches",
        f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]",
        _param("denoiser", DENOISER_MODEL),
        _param("contract", json.dumps(contract.to_dict(), sort_keys=True)),
        _param("max_videos", str(max_videos)),
        *([_param("denoiser_rows", str(meta.batch["fixed"]))] if "fixed" in meta.batch else []),
        _param("checkpoint_sha256", meta.checkpoint_sha256),
        *([_param("decoder", "decoder.onnx")] if frames is not None else []),
        ""])


def decoder_files(export_dir: Path, contract: Contract) -> tuple[list[Path], tuple | None]:
    """The export's fp32 decoder graphs and the frames they make of the contract's latents (3, F', H', W'),
    checked against the denoiser before they are copied; ([], None) without a decoder."""
    from vdit_deploy.decode import find_decoder, read_decoder_meta
    from vdit_deploy.export.variants import DECODER_CHUNK, find_variant

    first = find_decoder(export_dir)
    if first is None:
        return [], None
    dmeta = read_decoder_meta(first)
    dmeta.check_latent(contract.latent)
    chunk = find_variant(export_dir, DECODER_CHUNK) if dmeta.layout == "causal" else None
    if dmeta.layout == "causal" and chunk is None:
        raise VditError(f"{export_dir} has {first.name} but no {DECODER_CHUNK} graph; re-export the decoder")
    _, f, h, w = contract.latent
    return [first, *([chunk] if chunk else [])], (3, dmeta.frames_out(int(f)), h * dmeta.ratio, w * dmeta.ratio)


# ---- the repository -----------------------------------------------------------------------------
def _engine_batch(engine: Path, contract: Contract) -> tuple[int, str]:
    """A `vdit build` engine -> (its max batch, a note on where it runs), from the manifest beside it,
    refused when it was built for another model contract than the export's."""
    from vdit_deploy.runtimes.engine_cache import EngineCache, EngineProfile

    manifest_path = engine.with_suffix(".json")
    if not engine.is_file() or not manifest_path.is_file():
        raise VditError(f"{engine}: no such engine with its manifest {manifest_path.name} (see `vdit build`)")
    manifest = EngineCache(engine.parent).read_manifest(manifest_path)
    if manifest.get("kind") != "denoiser":
        raise VditError(f"{engine} is a {manifest.get('kind')} engine; the Triton sampler calls the denoiser: "
                        "build a denoiser engine with `vdit build`")
    key = manifest["key"]
    if key["contract"] != contract.sha256():
        raise VditError(f"{engine} was built from an export of another model contract than this one's "
                        f"({contract.describe_cond()}); build it from this export with `vdit build`")
    profile = EngineProfile.parse(key["profile"])
    if profile.batch.min != 1:
        raise VditError(f"{engine} accepts batch {profile.batch}; Triton's dynamic batcher needs batch 1 to be allowed")
    axes = "".join(f"; {name} {p.min}..{p.max} only" for name, p in profile.axes)
    return profile.batch.max, (f"the plan runs only on {key['gpu']} (sm {key['compute_capability']}) with TensorRT "
                               f"{key['tensorrt']}{axes}: use the Triton container that ships that TensorRT")


def write_triton_repo(export_dir: str | Path, out_dir: str | Path, engine: str | Path | None = None,
                      precision: str = "fp32", instances: int = 1, sampler_instances: int = SAMPLER_INSTANCES,
                      backend: str | None = None) -> list[str]:
    """Write the repository (atomically: DIR appears complete or not at all). -> notes for the user.
    backend: one of BACKENDS for the denoiser (default: tensorrt with an engine, else onnxruntime)."""
    from vdit_deploy.export.metadata import DENOISER, find_onnx, read_metadata

    backend = check_backend(backend, engine)
    onnx_path = find_onnx(export_dir, DENOISER, precision)
    meta = read_metadata(onnx_path)
    if meta.kind != DENOISER:
        raise VditError(f"{onnx_path} is a {meta.kind} graph; serve-export needs the denoiser")
    fixed = meta.batch.get("fixed")
    if fixed is not None and fixed not in (1, 2):    # a guided step's 2B rows must split into whole calls
        raise VditError(f"{onnx_path} has a fixed batch of {fixed}; a served export needs a batch range, or a "
                        "fixed batch of 1 or 2 (re-export with --batch 1:N)")
    notes = []
    if engine is not None:
        engine = Path(engine)
        max_batch, note = _engine_batch(engine, meta.contract)
        model_file = "model.plan"
        notes.append(note)
    else:
        lo, hi = meta.batch_range()
        if lo != 1 and fixed is None:
            raise VditError(f"{onnx_path} accepts batch {lo}..{hi}; Triton's dynamic batcher needs batch 1 allowed")
        max_batch = min(hi, 256)
        model_file = "model.onnx"
    if max_batch < 2 and fixed is None:
        raise VditError(f"the denoiser accepts at most batch {max_batch}; guidance needs 2 per video")
    # guidance runs each video twice (cond + null) in one call; a fixed batch's calls run one after another
    max_videos = max_batch // 2 if fixed is None else FIXED_BATCH_VIDEOS
    data = onnx_path.with_name(onnx_path.name + ".data")
    decoders, frames = decoder_files(onnx_path.parent, meta.contract)
    # an INT8 graph whose first steps run in float (runtimes/qdq_bins.py): the python backend runs them
    first_steps = {} if engine is not None else _float_props(onnx_path)
    fp32 = with_data(find_onnx(export_dir, DENOISER)) if first_steps and backend == "python" else []
    for file in (onnx_path, data, *decoders, *fp32):
        if file.exists() or file.is_symlink():
            check_inside(file, onnx_path.parent)
    with atomic_path(out_dir, is_dir=True, marker=f"{DENOISER_MODEL}/config.pbtxt") as tmp:
        den = tmp / DENOISER_MODEL / "1"
        den.mkdir(parents=True)
        if engine is not None:
            shutil.copyfile(engine, den / model_file)
        else:
            shutil.copyfile(onnx_path, den / model_file)
            if data.is_file():   # external weights keep the name the graph refers to
                shutil.copyfile(data, den / data.name)
            for file in fp32:         # the python backend's OrtRuntime runs the first steps on it
                shutil.copyfile(file, den / file.name)
        (tmp / DENOISER_MODEL / "config.pbtxt").write_text(denoiser_config(meta.io, backend, max_batch, instances,
                                                                           fixed))
        (tmp / SAMPLER_MODEL / "1").mkdir(parents=True)
        _write_python_models(tmp, meta.contract, onnx_path.parent, backend)
        for file in decoders:            # beside the sampler's model.py, under the names decode.py finds
            shutil.copyfile(file, tmp / SAMPLER_MODEL / "1" / file.name)
        (tmp / SAMPLER_MODEL / "config.pbtxt").write_text(sampler_config(meta, max_videos, sampler_instances, frames))
    notes.append(f"{SAMPLER_MODEL}: up to {max_videos} videos per request; {DENOISER_MODEL}: {backend} backend, "
                 + (f"dynamic batching up to {max_batch}" if fixed is None else
                    f"a fixed batch of {fixed} (no batching: each call is {fixed} row(s) of one request)"))
    if frames is not None:
        notes.append(f"{SAMPLER_MODEL}: output frames {list(frames)} per video, decoded by {decoders[0].name} "
                     "(ONNX Runtime, in the sampler) when a request asks for it")
    if first_steps and backend != "python":
        notes.append(float_note(first_steps, onnx_path.name, f"Triton's {backend} backend"))
    return notes


def _float_props(onnx_path: Path) -> dict:
    """The graph's metadata when it runs its first steps in float (qdq_bins.FLOAT_KEY), else {}."""
    import onnx

    from vdit_deploy.runtimes.qdq_bins import FLOAT_KEY
    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    return props if FLOAT_KEY in props else {}


def check_backend(backend: str | None, engine) -> str:
    """The denoiser's backend: a TensorRT plan (--engine) only on tensorrt, tensorrt only with a plan."""
    if backend is None:
        return "onnxruntime" if engine is None else "tensorrt"
    if backend not in BACKENDS:
        raise VditError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if (backend == "tensorrt") != (engine is not None):
        raise VditError("--engine (a `vdit build` plan) goes with the tensorrt backend, and the tensorrt backend "
                        f"needs one; got backend {backend} {'with' if engine is not None else 'without'} an engine")
    return backend


def _write_python_models(repo: Path, contract: Contract, export_dir: Path, backend: str) -> None:
    """The Python models' files: each model.py (one import of export/triton_python.py) and, beside it,
    the export's null conditioning (the sampler pairs requests with it; the python denoiser's runtime
    loads it with the graph), checked against the contract before it is copied."""
    models = [(SAMPLER_MODEL, "sampler", f"every sampler's loop over {DENOISER_MODEL} (BLS), {contract.describe_cond()}")]
    if backend == "python":
        models.append((DENOISER_MODEL, "denoiser", "model.onnx on vdit's ONNX Runtime runtime, batched calls"))
    if contract.cond:
        load_null(contract, export_dir)
    for model, role, doc in models:
        (repo / model / "1" / "model.py").write_text(model_py(model, role, doc))
        if contract.cond:
            shutil.copyfile(export_dir / NULL_FILE, repo / model / "1" / NULL_FILE)
