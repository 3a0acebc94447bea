"""From prompt to video: the stages around the denoiser (text encoder or prompt cache, sampling, the VAE
decoder) as one run, each timed and its peak memory measured. Torch-free over an export that holds a
prompt cache and decoder.onnx; the pipeline's text encoder (transformers) needs torch on the host."""
from __future__ import annotations

from pathlib import Path

from vdit_deploy.decode import Decoder, find_decoder


def video_decoder(out, runtime: str, artifact, latent, tile: int | None = None, providers=None):
    """Before sampling: what turns this model's latents into the pixels `out` shows, or None (a .npy
    output; a pixel-space model with 1 or 3 channels and no decoder). ONNX runtimes (ort, ort-trt, trt)
    decode through the export's decoder.onnx in ONNX Runtime (its default providers: CUDA where there is
    one); the torch runtime on a diffusers transformer in a pipeline layout uses diffusers' ../vae."""
    from vdit_deploy.video import check_drawable

    if out is None or Path(out).suffix.lower() == ".npy":
        return None
    if runtime == "torch":
        vae_dir = Path(artifact).parent / "vae"
        if (vae_dir / "config.json").is_file() and int(latent[0]) not in (1, 3):
            from vdit_deploy.export.decoder_export import TorchDecoder
            return TorchDecoder(vae_dir, latent, tile)
    elif find_decoder(artifact) is not None:
        decoder = Decoder(artifact, tile=tile, providers=providers)
        decoder.meta.check_latent(latent)
        return decoder
    check_drawable(out, int(latent[0]))
    return None
