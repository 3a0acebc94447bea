"""The Triton Python-backend models of a `vdit serve-export` repository, and the request they serve.

    vdit_sampler    one request = one sampling job: any sampler (unipc, dpm++, ddim, ddpm) with its own
                    noise and its own multistep SolverState; one BLS call to vdit_denoiser per step
                    (cond and null as one 2B batch), the same loop as `vdit sample` (sampling.sample);
                    with decoder.onnx beside it, the output `frames` too (the latents decoded, as
                    `vdit sample --out x.mp4` decodes them) when the request asks for that output
    vdit_denoiser   (`--backend python`) the export's denoiser on vdit's ONNX Runtime runtime, in-process:
                    Triton's dynamic batcher hands it the calls of concurrent sampling loops, it runs the
                    calls of one shape as one ONNX Runtime batch

The repository's model.py files are one import of these classes, so the server's Python needs
vdit-deploy (`pip install vdit-deploy`; torch is not needed). A bad request is answered with the
project's one-line message as INVALID_ARG and fails alone; the server goes on. triton_python_backend_utils
exists only inside Triton's Python stub: it is imported in initialize(), and nothing here imports torch.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vdit_deploy import validate
from vdit_deploy.contract import Contract, load_null
from vdit_deploy.errors import VditError
from vdit_deploy.runtimes.base import in_rows

DEFAULT_GUIDANCE = 2.0     # as `vdit sample --guidance`
# the sampler's optional request inputs, each of shape [1]: name -> Triton type (eta and guidance in float64:
# the CLI's values exactly, so the same request is the same video). Omitted: the export's default sampler
# (sampling.default_sampler) with its own steps and order, eta 0, seed 0, DEFAULT_GUIDANCE.
REQUEST_OPTIONS = {"seed": "TYPE_INT64", "sampler": "TYPE_STRING", "steps": "TYPE_INT32", "order": "TYPE_INT32",
                   "eta": "TYPE_FP64", "guidance": "TYPE_FP64"}


class Cancelled(Exception):
    """The client went away (disconnect, deadline): the loop stops at the next step."""


def sample_request(denoise, contract: Contract, cond: dict, null: dict, seed: int = 0, sampler: str | None = None,
                   steps: int | None = None, order: int | None = None, eta: float = 0.0,
                   guidance: float = DEFAULT_GUIDANCE, max_videos: int | None = None) -> np.ndarray:
    """One request, checked before any denoiser call: `sampler` over `denoise(x_t, t, cond) -> out` (a
    BLS call in Triton), `cond` the request's conditioning by name (batch first), `null` the export's
    batch-1 null conditioning. -> (B, C, F, H, W) float32, `vdit sample`'s video for the same seed."""
    from vdit_deploy.sampling import default_sampler, sample, sampler_plan

    validate.integer(seed, "seed", 0)
    validate.number(guidance, "guidance", 0)
    validate.number(eta, "eta", 0)
    cond = contract.check_cond(cond, what="request")
    b = contract.batch_of(cond)
    if b == 0:
        raise VditError(f"{contract.names[0]}: give the conditioning of at least one video")
    if max_videos is not None and b > max_videos:
        raise VditError(f"{contract.names[0]}: at most {max_videos} videos per request (the denoiser's batch limit), "
                        f"got {b}")
    for name, value in cond.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise VditError(f"request {name} holds NaN or inf")
    plan = sampler_plan(contract, default_sampler(contract) if sampler is None else sampler, steps, eta, order)
    return sample(denoise, contract, cond, plan, guidance, seed, null=null)


def _parameters(args: dict) -> dict:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def _version_dir(args: dict) -> Path:
    """The model's version directory (model.py, its files), from what Triton passes to initialize."""
    return Path(args["model_repository"]) / args["model_version"]


def _error(pb, e: Exception):
    """An exception -> the response's error: ours (bad input) as INVALID_ARG, anything else as INTERNAL."""
    if isinstance(e, VditError):
        return pb.TritonError(" ".join(str(e).split()), pb.TritonError.INVALID_ARG)
    if isinstance(e, Cancelled):
        return pb.TritonError("cancelled: the client went away", pb.TritonError.CANCELLED)
    return pb.TritonError(f"{type(e).__name__}: {' '.join(str(e).split())}", pb.TritonError.INTERNAL)


def sampler_outputs(video: np.ndarray, decoder=None, requested=()) -> dict:
    """A sampler response's tensors: the latents as `video`, and with a decoder `frames` (decode.Decoder:
    (B, 3, F', H', W') in [-1, 1]) when the request names that output (or names none: Triton's all)."""
    out = {"video": video}
    if decoder is not None and (not requested or "frames" in requested):
        out["frames"] = decoder.decode(video)
    return out


class SamplerModel:
    """vdit_sampler: request inputs are the contract's conditioning by name and REQUEST_OPTIONS."""

    def initialize(self, args):
        import triton_python_backend_utils as pb

        self.pb = pb
        params = _parameters(args)
        self.denoiser = params["denoiser"]
        self.contract = Contract.from_dict(json.loads(params["contract"]))
        self.null = load_null(self.contract, _version_dir(args))   # checked against the contract's hash
        self.max_videos = int(params["max_videos"])
        self.rows = int(params.get("denoiser_rows", "0")) or None   # a fixed-batch denoiser's rows per call
        self.decoder = None
        if params.get("decoder"):                 # the repository's decoder.onnx (+ decoder-chunk.onnx)
            from vdit_deploy.decode import Decoder
            self.decoder = Decoder(_version_dir(args))
        # the denoiser may run on a GPU: ask Triton for its output in host memory (numpy math here)
        self.cpu = pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0)

    def read(self, request) -> dict:
        """The request's tensors -> sample_request's arguments (an omitted option: its default)."""
        pb = self.pb
        cond = {name: pb.get_input_tensor_by_name(request, name) for name in self.contract.names}
        missing = [name for name, tensor in cond.items() if tensor is None]
        if missing:
            raise VditError(f"request lacks {', '.join(missing)}: the model takes {self.contract.describe_cond()}")
        args = {"cond": {name: tensor.as_numpy() for name, tensor in cond.items()}}
        for name, kind in REQUEST_OPTIONS.items():
            tensor = pb.get_input_tensor_by_name(request, name)
            if tensor is None:
                continue
            value = tensor.as_numpy().reshape(-1)[0]
            if kind == "TYPE_STRING":
                try:
                    value = value.decode() if isinstance(value, bytes) else str(value)
                except UnicodeDecodeError:
                    raise VditError(f"request {name} is not UTF-8 text") from None
            args[name] = float(value) if kind == "TYPE_FP64" else value if kind == "TYPE_STRING" else int(value)
        return args

    def denoiser_call(self, request):
        """`denoise(x_t, t, cond)` for one request's loop: a BLS call to the denoiser, whose dynamic
        batcher merges it with the other loops' calls; stops the loop once the client is gone."""
        pb = self.pb
        scalar = lambda a: a.reshape(-1, 1) if a.ndim == 1 else a   # per-sample scalars go as (B, 1)

        def call(x_t, t, cond):
            inputs = [pb.Tensor("x_t", x_t), pb.Tensor("t", scalar(t))]
            inputs += [pb.Tensor(name, scalar(value)) for name, value in cond.items()]
            response = pb.InferenceRequest(model_name=self.denoiser, requested_output_names=["out"], inputs=inputs,
                                           preferred_memory=self.cpu).exec()
            if response.has_error():
                raise RuntimeError(f"{self.denoiser}: {response.error().message()}")
            return pb.get_output_tensor_by_name(response, "out").as_numpy()

        def denoise(x_t, t, cond):
            if request.is_cancelled():
                raise Cancelled()
            if self.rows is None:
                return call(x_t, t, cond)
            return in_rows(call, self.rows, x_t, t, cond)     # a fixed batch: calls of exactly its rows
        return denoise

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                video = sample_request(self.denoiser_call(request), self.contract, null=self.null,
                                       max_videos=self.max_videos, **self.read(request))
                outs = sampler_outputs(video, self.decoder, request.requested_output_names())
                responses.append(self.pb.InferenceResponse(
                    output_tensors=[self.pb.Tensor(name, value) for name, value in outs.items()]))
            except Exception as e:   # a bad request fails alone, with its message
                responses.append(self.pb.InferenceResponse(output_tensors=[], error=_error(self.pb, e)))
        return responses


class DenoiserModel:
    """vdit_denoiser on the Python backend: model.onnx beside model.py, run by OrtRuntime on the CPU."""

    def initialize(self, args):
        import triton_python_backend_utils as pb

        from vdit_deploy.runtimes.ort_runtime import OrtRuntime

        self.pb = pb
        params = _parameters(args)
        threads = int(params.get("threads", "0")) or None   # 0: ONNX Runtime's default (the cores)
        # no spinning: the sampler loops share these cores between the denoiser's calls
        self.runtime = OrtRuntime(_version_dir(args) / "model.onnx", providers=["cpu"], threads=threads, spin=False)
        self.contract = self.runtime.contract
        self.names = ["x_t", "t", *self.contract.names]
        # per-sample scalars (t, a label) arrive as (B, 1) or (B,): the graph takes (B,)
        self.scalar = {"t", *(c.name for c in self.contract.cond if len(c.shape) == 1)}

    def run(self, arrays: list[dict]) -> list[np.ndarray]:
        """The requests' inputs (name -> array, batch first, all of one shape) as one batch -> each one's out."""
        batch = {n: np.concatenate([a[n] for a in arrays]) for n in self.names}
        batch = {n: v.reshape(-1) if n in self.scalar else v for n, v in batch.items()}
        out = self.runtime.denoise_rows(batch["x_t"], batch["t"], {n: batch[n] for n in self.contract.names})
        return np.split(out, np.cumsum([len(a["x_t"]) for a in arrays])[:-1])

    def execute(self, requests):
        pb = self.pb
        arrays = [{n: pb.get_input_tensor_by_name(r, n).as_numpy() for n in self.names} for r in requests]
        groups: dict[tuple, list[int]] = {}   # the batcher merges equal shapes; stay safe if it did not
        for i, a in enumerate(arrays):
            groups.setdefault(tuple(v.shape[1:] for v in a.values()), []).append(i)
        responses = [None] * len(requests)
        for members in groups.values():
            try:
                outs = self.run([arrays[i] for i in members])
                for i, out in zip(members, outs):
                    responses[i] = pb.InferenceResponse(output_tensors=[pb.Tensor("out", out)])
            except Exception as e:
                for i in members:
                    responses[i] = pb.InferenceResponse(output_tensors=[], error=_error(pb, e))
        return responses


MODELS = {"sampler": SamplerModel, "denoiser": DenoiserModel}

MODEL_PY = '''"""Triton Python-backend model {model}, written by `vdit serve-export`: {doc}
The code is vdit_deploy's (vdit_deploy.export.triton_python.{cls}); the server's Python needs it:
    pip install vdit-deploy
"""
from vdit_deploy.export.triton_python import {cls} as TritonPythonModel  # noqa: F401
'''


def model_py(model: str, role: str, doc: str) -> str:
    return MODEL_PY.format(model=model, cls=MODELS[role].__name__, doc=doc)
