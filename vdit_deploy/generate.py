"""From prompt to video: the stages around the denoiser as one run (`vdit generate`), each with a progress
bar, timed, and its host memory peak measured:

    encode   the prompts and the negative prompt (the null conditioning): the pipeline's text encoder on
             the host (--pipeline: text_encoder.py, transformers + torch), else the export's
             text_encoder.onnx (text_onnx.py, torch-free), both filling the prompt cache (EXPORT/prompts),
             else the cache alone
    sample   the denoiser on any runtime (sampling.py), guidance paired with the negative prompt
    decode   decoder.onnx in ONNX Runtime (decode.py), or on --runtime trt its `vdit build` engines
             (runtimes/trt_decoder.py); spatial tiles from --tile or the profile's vae_tile
    write    the video (.mp4, .gif) or the latents (.npy)
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vdit_deploy.decode import Decoder, find_decoder
from vdit_deploy.errors import VditError
from vdit_deploy.export.variants import FP32

PROMPT_CACHE = "prompts"          # the prompt cache's folder inside an export directory


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class StageReport:
    name: str
    seconds: float
    peak_bytes: int               # the highest resident memory seen during the stage (sampled every 5 ms)
    start_bytes: int


@dataclass
class GenerateReport:
    stages: list = field(default_factory=list)

    @contextmanager
    def stage(self, name: str):
        start_rss, peak = rss_bytes(), [0]
        done = threading.Event()

        def poll():
            while not done.wait(0.005):
                peak[0] = max(peak[0], rss_bytes())

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            done.set()
            watcher.join()
            self.stages.append(StageReport(name, seconds, max(peak[0], rss_bytes(), start_rss), start_rss))

    def table(self) -> str:
        lines = [f"{'stage':<8} {'seconds':>8} {'peak RSS MB':>12} {'+MB':>8}"]
        for s in self.stages:
            lines.append(f"{s.name:<8} {s.seconds:>8.2f} {s.peak_bytes / 1e6:>12.1f} "
                         f"{(s.peak_bytes - s.start_bytes) / 1e6:>8.1f}")
        lines.append(f"{'total':<8} {sum(s.seconds for s in self.stages):>8.2f}   (host memory of this process; "
                     "a GPU's own memory is not counted)")
        return "\n".join(lines)


def text_input(contract):
    """The contract's text conditioning: its one (batch, seq, width) float input."""
    specs = [c for c in contract.cond if c.dtype.startswith("float") and len(c.shape) == 3]
    if len(specs) != 1 or len(contract.cond) != 1:
        raise VditError(f"vdit generate drives models conditioned on one text embedding; this one takes "
                        f"{contract.describe_cond()} (use `vdit sample --cond`)")
    return specs[0]


def encode_prompts(prompts: list, negative: str, cache_dir, pipeline=None, export_dir=None):
    """(cond, null): with the pipeline's text encoder (host, torch), else the export's text_encoder.onnx
    (torch-free), both filling the cache; else from the cache alone."""
    from vdit_deploy.text_encoder import TextEncoder, from_cache

    if pipeline is not None:
        return TextEncoder(pipeline).encode(prompts, negative, cache_dir)
    if export_dir is not None and has_text_encoder(export_dir):
        from vdit_deploy.text_onnx import OnnxTextEncoder
        return OnnxTextEncoder(export_dir).encode(prompts, negative, cache_dir)
    return from_cache(cache_dir, prompts, negative)


def _note(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def has_text_encoder(export_dir) -> bool:
    from vdit_deploy.export.variants import TEXT_ENCODER, variant_file

    return (Path(export_dir) / variant_file(TEXT_ENCODER)).is_file()


def generate(export_dir, prompts: list, out, negative: str = "", pipeline=None, cache_dir=None,
             runtime: str = "ort", precision: str = FP32, sampler: str | None = None, steps=None, guidance=5.0,
             seed: int = 0, tile: int | None = None, eta: float = 0.0, order=None, spacing=None,
             progress: bool = True, options: dict | None = None, decode_npy: bool = False,
             step_cache: dict | None = None):
    """Prompts -> video file through an export (denoiser + decoder.onnx + prompt cache). -> GenerateReport.
    A .npy out holds the latents, or with decode_npy the decoded video (float, [-1, 1])."""
    from vdit_deploy.files import check_output
    from vdit_deploy.progress import bar
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import sample, sampler_plan
    from vdit_deploy.video import check_suffix, write_video

    export_dir = Path(export_dir)
    out = check_output(check_suffix(out))
    if not prompts:
        raise VditError("give at least one --prompt")
    cache_dir = Path(cache_dir) if cache_dir else export_dir / PROMPT_CACHE
    report = GenerateReport()
    with open_runtime(runtime, export_dir, precision=precision, **(options or {})) as rt:
        contract = rt.contract
        spec = text_input(contract)
        shown = out.with_suffix(".mp4") if decode_npy else out          # what decides whether to decode
        decoder = video_decoder(shown, runtime, export_dir, contract.latent, tile, precision=precision)
        if pipeline is None and not has_text_encoder(export_dir):
            from vdit_deploy.text_encoder import check_cached
            check_cached(cache_dir, [*prompts, negative])
        with report.stage("encode"):
            for _ in bar(range(1), show=progress, desc="encode"):
                cond, null = encode_prompts(list(prompts), negative, cache_dir, pipeline, export_dir)
        cond = {spec.name: cond}
        rt.null = {spec.name: null}                  # guidance pairs each prompt with the negative prompt
        if hasattr(rt, "_null_rows"):
            del rt._null_rows
        plan = sampler_plan(contract, sampler, steps, eta, order, spacing)
        started = None
        if step_cache is not None:                   # vdit sample --cache's step caching (step_cache.py)
            from vdit_deploy.step_cache import policy_for
            started = policy_for(rt, **step_cache).start(len(plan))
        with report.stage("sample"):
            videos = sample(rt, contract, cond, plan, guidance, seed, progress=progress, cache=started)
        if decoder is not None:
            with report.stage("decode"):
                videos = np.concatenate([decoder.decode(v[None]) for v in
                                         bar(videos, show=progress, desc="decode", unit="video")])
            decoder.close()
    with report.stage("write"):
        write_video(out, videos, scale=1 if videos.shape[-1] >= 64 else 4)
    return report


def video_decoder(out, runtime: str, artifact, latent, tile: int | None = None, providers=None,
                  precision: str | None = None, log=None):
    """Before sampling: what turns this model's latents into the pixels `out` shows, or None (a .npy
    output; a pixel-space model with 1 or 3 channels and no decoder). trt decodes on the decoder's
    TensorRT engines (`vdit build`), or without one on ONNX Runtime with a one-line note (`log`, default
    stderr); ort and ort-trt through the export's decoder.onnx in ONNX Runtime (its default providers:
    CUDA where there is one); the torch runtime on a diffusers transformer in a pipeline layout uses
    diffusers' ../vae."""
    from vdit_deploy.video import check_drawable

    if out is None or Path(out).suffix.lower() == ".npy":
        return None
    if runtime == "trt" and find_decoder(artifact) is not None:
        from vdit_deploy.export.variants import FP16
        from vdit_deploy.runtimes.trt_decoder import NoDecoderEngine, TrtDecoder

        try:
            decoder = TrtDecoder(artifact, precision or FP16, tile=tile)
            decoder.meta.check_latent(latent)
            return decoder
        except NoDecoderEngine as e:
            (log or _note)(f"note: decoding on ONNX Runtime: {e}")
    if runtime == "torch":
        vae_dir = Path(artifact).parent / "vae"
        if (vae_dir / "config.json").is_file() and int(latent[0]) not in (1, 3):
            from vdit_deploy.export.decoder_export import TorchDecoder
            return TorchDecoder(vae_dir, latent, tile)
    elif find_decoder(artifact) is not None:     # the fp16 decoder where the export has one and fp16 is asked
        from vdit_deploy.export.variants import BEST, FP16, FP32

        fp16 = precision in (FP16, BEST) and find_decoder(artifact, FP16) is not None
        decoder = Decoder(artifact, FP16 if fp16 else FP32, tile=tile, providers=providers)
        decoder.meta.check_latent(latent)
        return decoder
    check_drawable(out, int(latent[0]))
    return None
