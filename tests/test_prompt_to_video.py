"""Prompt to MP4 for CogVideoX and Wan: tiny random pipelines saved with save_pretrained (transformer, vae,
scheduler, a tiny T5 / umT5 text encoder and its tokenizer), taken through `vdit encode`, `vdit export`,
`vdit export-decoder` and `vdit generate` on ONNX Runtime with torch unimportable; the decoded frames
equal the pipeline's own decode (its latent scaling, then diffusers' vae.decode) of the same latents."""
import types

import numpy as np
import pytest

pytestmark = pytest.mark.slow
diffusers = pytest.importorskip("diffusers", reason="pip install 'vdit-deploy[dev]' for the diffusers model tests")
pytest.importorskip("transformers", reason="the text encoder tests need transformers")

from pipelines import COG_LATENT, WAN_LATENT, save_cogvideox_pipeline, save_wan_pipeline  # noqa: E402

from test_generate import generate_without_torch, run_cli  # noqa: E402

PROMPT = "a cat playing piano"


def pipeline_decode(family: str, vae_dir, latents: np.ndarray) -> np.ndarray:
    """What CogVideoXPipeline.decode_latents / WanPipeline.__call__ do with (B, C, F, h, w) latents, on
    the VAE diffusers loads itself; clamped to [-1, 1] as the video processor's postprocess does."""
    import torch

    z = torch.from_numpy(latents)
    with torch.no_grad():
        if family == "cogvideox":
            vae = diffusers.AutoencoderKLCogVideoX.from_pretrained(vae_dir).eval()
            fake = types.SimpleNamespace(vae=vae, vae_scaling_factor_image=vae.config.scaling_factor)
            video = diffusers.CogVideoXPipeline.decode_latents(fake, z.permute(0, 2, 1, 3, 4))   # takes (B, F, C, h, w)
        else:
            vae = diffusers.AutoencoderKLWan.from_pretrained(vae_dir).eval()
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
            std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
            video = vae.decode(z / std + mean, return_dict=False)[0]
    return np.clip(video.numpy(), -1, 1)


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_prompt_to_mp4_through_ort(family, tmp_path, capsys):
    import imageio.v3 as iio

    from vdit_deploy.generate import generate

    save, latent = {"cogvideox": (save_cogvideox_pipeline, COG_LATENT), "wan": (save_wan_pipeline, WAN_LATENT)}[family]
    pipe, export = save(tmp_path / family), tmp_path / "export"
    null = tmp_path / "null.safetensors"
    run_cli(["encode", pipe, "--prompt", "x", "--null-out", null], capsys)     # the empty prompt: guidance's null
    run_cli(["export", pipe / "transformer", "--out", export, "--batch", "1:2", "--latent", ",".join(map(str, latent)),
             "--null", null, "--no-verify"], capsys)
    run_cli(["export-decoder", pipe / "vae", "--out", export, "--no-verify"], capsys)
    assert "encoded 1 prompt(s)" in run_cli(["encode", pipe, "--prompt", PROMPT, "--cache", export / "prompts"], capsys)

    generate_without_torch(export, PROMPT, 3, tmp_path / "a.mp4")

    # the same run in the library: its latents, and its decoded video, against the pipeline's decode
    generate(export, [PROMPT], tmp_path / "z.npy", steps=3, seed=3, guidance=4, progress=False)
    generate(export, [PROMPT], tmp_path / "v.npy", steps=3, seed=3, guidance=4, progress=False, decode_npy=True)
    latents, video = np.load(tmp_path / "z.npy"), np.load(tmp_path / "v.npy")
    assert latents.shape == (1, *latent) and np.abs(latents).max() > 0.1
    ref = pipeline_decode(family, pipe / "vae", latents)
    assert video.shape == ref.shape and np.abs(video - ref).max() < 1e-4
    assert ref.std() > 1e-3                                       # a video, not a constant
    frames = iio.imread(tmp_path / "a.mp4")                       # F' frames, upscaled x4 (+ a border) for viewing
    assert frames.shape[0] == ref.shape[2] and frames.shape[1] >= 4 * ref.shape[3] and frames.shape[2] >= 4 * ref.shape[4]
