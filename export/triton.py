"""An NVIDIA Triton Inference Server model repository for an export: `vdit serve-export EXPORT --triton DIR`.

    DIR/vdit_denoiser/config.pbtxt   the denoiser (ONNX Runtime or a TensorRT plan), dynamic batching
    DIR/vdit_denoiser/1/model.onnx   (or model.plan)
    DIR/vdit_sampler/config.pbtxt    the DDIM loop as a Python-backend model
    DIR/vdit_sampler/1/model.py      calls the denoiser once per step through BLS
    DIR/vdit_sampler/1/null_cond.safetensors   the export's null conditioning (guidance's other half)

One sampler request (the model contract's conditioning, each input by its name: `y` labels for the
built-in model, `encoder_hidden_states` (B, L, D) text embeddings for a Latte; optional seed, steps,
guidance, eta) runs a whole DDIM loop; the loop pairs the request's conditioning with the null
conditioning it read from null_cond.safetensors beside model.py, so a client never sends it. The
denoiser calls of concurrent requests are batched together by Triton's dynamic batcher (requests whose
named axes, e.g. the token count, are equal), so throughput grows with load and the denoiser model can
have instances on many GPUs. The step math is vdit_deploy's (the same noise for the same seed as
`vdit sample`): the server's Python needs `pip install --no-deps vdit-deploy tqdm safetensors`.
Nothing here imports tritonclient or torch; tests validate the configs against Triton's protobuf schema.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from vdit_deploy.contract import NULL_FILE, Contract, load_null
from vdit_deploy.errors import VditError
from vdit_deploy.files import atomic_path, check_inside

DENOISER_MODEL, SAMPLER_MODEL = "vdit_denoiser", "vdit_sampler"
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
                 "bool": "TYPE_BOOL"}
MAX_QUEUE_DELAY_US = 2000   # how long a denoiser call may wait for others to batch with
OPTIONS = {"seed": ("TYPE_INT64", 0), "steps": ("TYPE_INT32", 50), "guidance": ("TYPE_FP32", 2.0),
           "eta": ("TYPE_FP32", 0.0)}   # the sampler's optional request inputs and their defaults


# ---- the sampling loop the Python model runs ----------------------------------------------------
def sample_request(denoise, contract: Contract, cond: dict, null: dict, seed: int = 0, steps: int = 50,
                   guidance: float = 2.0, eta: float = 0.0, max_videos: int | None = None) -> np.ndarray:
    """One request: DDIM over `denoise(x_t, t, cond) -> out` (a BLS call in Triton), `cond` the
    request's conditioning by name (batch first), `null` the export's batch-1 null conditioning.
    -> (B, C, F, H, W) fp32."""
    from vdit_deploy.samplers import make_steps
    from vdit_deploy.sampling import sample

    cond = contract.check_cond(cond, what="request")
    b = contract.batch_of(cond)
    if b == 0:
        raise VditError(f"{contract.names[0]}: give the conditioning of at least one video")
    if max_videos is not None and b > max_videos:
        raise VditError(f"{contract.names[0]}: at most {max_videos} videos per request (the denoiser's batch limit), "
                        f"got {b}")
    if contract.schedule.kind == "flow":     # the model's own flow sampler (its pipeline's)
        plan = make_steps(contract.schedule, contract.schedule.sampler, int(steps), float(eta), prediction="flow")
    else:
        plan = make_steps(contract.schedule, "ddim", int(steps), float(eta), prediction=contract.prediction)
    return sample(denoise, contract, cond, plan, float(guidance), int(seed), null=null)


# ---- config.pbtxt ---------------------------------------------------------------------------------
def _dims(shape) -> list[int]:
    """Per-sample dims: sizes, and -1 for a named (variable) axis such as the token count."""
    return [d if isinstance(d, int) else -1 for d in shape]


def _tensor(spec: dict) -> str:
    """An export io spec {name, shape, dtype} -> a Triton input/output entry. With batching Triton owns
    axis 0; a per-sample scalar (shape [batch]) is sent as [batch, 1] and reshaped to [batch]."""
    if spec["dtype"] not in TRITON_DTYPES:
        raise VditError(f"tensor {spec['name']}: dtype {spec['dtype']} has no Triton type here")
    dims = _dims(spec["shape"][1:])
    reshape = ""
    if not dims:
        dims, reshape = [1], " reshape: { shape: [ ] }"
    return (f'  {{ name: "{spec["name"]}" data_type: {TRITON_DTYPES[spec["dtype"]]} '
            f'dims: [ {", ".join(map(str, dims))} ]{reshape} }}')


def _param(key: str, value: str) -> str:
    # json.dumps of an ASCII str is a valid protobuf text-format string literal (\" and \\ escapes)
    return f"parameters {{ key: {json.dumps(key)} value: {{ string_value: {json.dumps(value)} }} }}"


def denoiser_config(io: dict, platform: str, max_batch: int, instances: int) -> str:
    kind = "KIND_GPU" if platform == "tensorrt_plan" else "KIND_AUTO"   # AUTO: GPU if there is one
    return "\n".join([
        f'name: "{DENOISER_MODEL}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch}",
        "input [", ",\n".join(_tensor(s) for s in io["inputs"]), "]",
        "output [", ",\n".join(_tensor(s) for s in io["outputs"]), "]",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}",
        "}",
        f"instance_group [ {{ count: {instances} kind: {kind} }} ]",
        ""])


def sampler_config(meta, max_videos: int, instances: int) -> str:
    contract = meta.contract
    cond = [f'  {{ name: "{c.name}" data_type: {TRITON_DTYPES[c.dtype]} dims: [ {", ".join(map(str, _dims(c.shape)))} ] }}'
            for c in contract.cond]
    options = [f'  {{ name: "{name}" data_type: {dtype} dims: [ 1 ] optional: true }}'
               for name, (dtype, _) in OPTIONS.items()]
    return "\n".join([
        f'name: "{SAMPLER_MODEL}"',
        'backend: "python"',
        "max_batch_size: 0   # one request = one sampling job; batching happens at the denoiser",
        f"# the conditioning: {contract.describe_cond()} (one row per video)",
        "input [", ",\n".join(cond + options), "]",
        "output [",
        f'  {{ name: "video" data_type: TYPE_FP32 dims: [ -1, {", ".join(map(str, contract.latent))} ] }}',
        "]",
        "# concurrent sampling loops: their denoiser calls are what the dynamic batcher batches",
        f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]",
        _param("denoiser", DENOISER_MODEL),
        _param("contract", json.dumps(contract.to_dict(), sort_keys=True)),
        _param("max_videos", str(max_videos)),
        _param("checkpoint_sha256", meta.checkpoint_sha256),
        ""])


MODEL_PY = '''"""Triton Python-backend model: vdit DDIM sampling, one BLS call to {denoiser} per step.

Generated by `vdit serve-export`. Needs vdit-deploy in the server's Python:
    pip install --no-deps vdit-deploy tqdm safetensors
Inputs: the model contract's conditioning by name ({cond}), one row per video; optional seed int64 [1]
(0), steps int32 [1] (50), guidance fp32 [1] (2.0), eta fp32 [1] (0.0). The null conditioning guidance
pairs it with is null_cond.safetensors beside this file. Output: video fp32 [B, C, F, H, W] in [-1, 1],
the same as `vdit sample --seed`.
"""
import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from vdit_deploy.contract import Contract, load_null
from vdit_deploy.export.triton import OPTIONS, sample_request


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {{k: v["string_value"] for k, v in config.get("parameters", {{}}).items()}}
        self.denoiser = params["denoiser"]
        self.contract = Contract.from_dict(json.loads(params["contract"]))
        self.null = load_null(self.contract, Path(__file__).parent)   # checked against the contract's hash
        self.max_videos = int(params["max_videos"])
        # the denoiser may run on a GPU: ask Triton for its output in host memory (numpy math here)
        self.cpu = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)

    def denoise(self, x_t, t, cond):
        # x_t (2B, C, F, H, W) with guidance; per-sample scalars (t, a label) go as (2B, 1): the
        # denoiser config reshapes them to (2B,)
        scalar = lambda a: a.reshape(-1, 1) if a.ndim == 1 else a
        inputs = [pb_utils.Tensor("x_t", x_t), pb_utils.Tensor("t", scalar(t))]
        inputs += [pb_utils.Tensor(name, scalar(value)) for name, value in cond.items()]
        request = pb_utils.InferenceRequest(model_name=self.denoiser, requested_output_names=["out"],
                                            inputs=inputs, preferred_memory=self.cpu)
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(response.error().message())
        return pb_utils.get_output_tensor_by_name(response, "out").as_numpy()

    def read(self, request):
        args = {{"cond": {{name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                         for name in self.contract.names}}}}
        for name, (_, default) in OPTIONS.items():
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            args[name] = type(default)(tensor.as_numpy().reshape(-1)[0]) if tensor is not None else default
        return args

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                video = sample_request(self.denoise, self.contract, null=self.null, max_videos=self.max_videos,
                                       **self.read(request))
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("video", video)]))
            except Exception as e:   # a bad request fails alone, with its message
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
        return responses
'''


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
                      precision: str = "fp32", instances: int = 1, sampler_instances: int = 4) -> list[str]:
    """Write the repository (atomically: DIR appears complete or not at all). -> notes for the user."""
    from vdit_deploy.export.metadata import DENOISER, find_onnx, read_metadata

    onnx_path = find_onnx(export_dir, DENOISER, precision)
    meta = read_metadata(onnx_path)
    if meta.kind != DENOISER:
        raise VditError(f"{onnx_path} is a {meta.kind} graph; serve-export needs the denoiser")
    if "fixed" in meta.batch:
        raise VditError(f"{onnx_path} has a fixed batch of {meta.batch['fixed']}; Triton's dynamic batching "
                        "needs an export with a batch range (re-export without a fixed batch)")
    notes = []
    if engine is not None:
        engine = Path(engine)
        max_batch, note = _engine_batch(engine, meta.contract)
        platform, model_file = "tensorrt_plan", "model.plan"
        notes.append(note)
    else:
        lo, hi = meta.batch_range()
        if lo != 1:
            raise VditError(f"{onnx_path} accepts batch {lo}..{hi}; Triton's dynamic batcher needs batch 1 allowed")
        max_batch = min(hi, 256)
        platform, model_file = "onnxruntime_onnx", "model.onnx"
    if max_batch < 2:
        raise VditError(f"the denoiser accepts at most batch {max_batch}; guidance needs 2 per video")
    max_videos = max_batch // 2          # guidance runs each video twice (cond + null) in one call
    data = onnx_path.with_name(onnx_path.name + ".data")
    for file in (onnx_path, data):
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
        (tmp / DENOISER_MODEL / "config.pbtxt").write_text(denoiser_config(meta.io, platform, max_batch, instances))
        sam = tmp / SAMPLER_MODEL / "1"
        sam.mkdir(parents=True)
        (sam / "model.py").write_text(MODEL_PY.format(denoiser=DENOISER_MODEL, cond=meta.contract.describe_cond()))
        if meta.contract.cond:   # the loop's half of guidance, checked against the contract when loaded
            load_null(meta.contract, onnx_path.parent)
            shutil.copyfile(onnx_path.parent / NULL_FILE, sam / NULL_FILE)
        (tmp / SAMPLER_MODEL / "config.pbtxt").write_text(sampler_config(meta, max_videos, sampler_instances))
    notes.append(f"{SAMPLER_MODEL}: up to {max_videos} videos per request; {DENOISER_MODEL}: {platform}, "
                 f"dynamic batching up to {max_batch}")
    return notes
