"""Decoded frames beyond `vdit sample`: `vdit compare` draws samples.gif from decoded frames (one decoder
for every column: the export's decoder.onnx, or a pipeline's diffusers vae/), and the Triton sampler of
an export with a decoder has an output `frames`, what the ONNX Runtime decoder makes of its latents."""
import shutil

import numpy as np
import pytest

pytest.importorskip("diffusers", reason="pip install 'vdit-deploy[dev]' for the diffusers model tests")

from pipelines import tiny_vae  # noqa: E402


@pytest.fixture(scope="module")
def latte_with_decoder(tiny_latte_export, tmp_path_factory):
    """tiny_latte_export (latents 4x2x8x8) + the tiny AutoencoderKL's decoder.onnx beside it."""
    from vdit_deploy.export.decoder_export import export_decoder

    root = tmp_path_factory.mktemp("frames")
    export = root / "export"
    shutil.copytree(tiny_latte_export, export)
    tiny_vae("kl").save_pretrained(root / "vae")
    export_decoder(root / "vae", export)
    return export, root / "vae"


def prompts(path, rows: int = 2):
    from safetensors.numpy import save_file

    save_file({"encoder_hidden_states": np.random.default_rng(0).standard_normal((rows, 16, 32), dtype=np.float32)},
              str(path))
    return path


def test_compare_gif_shows_decoded_frames(latte_with_decoder, tmp_path):
    """An export with a decoder: samples.gif's frames are the decoded videos (16x16, x4 for viewing), not
    the 4-channel latents (which a GIF cannot show: before, no GIF at all)."""
    import imageio.v3 as iio

    from vdit_deploy.compare import compare

    export, _ = latte_with_decoder
    report = compare(export, tmp_path / "r", "ort:fp32,ort:fp16", steps=2, batches=[1], seeds=[0], sampler="ddim",
                     repeats=1, progress=False, log=lambda m: None, cond=prompts(tmp_path / "p.safetensors"))
    assert report["files"]["gif"] == "samples.gif", report["notes"]
    assert any("decoded by decoder.onnx" in n for n in report["notes"]), report["notes"]
    frames = iio.imread(tmp_path / "r" / "samples.gif")
    assert frames.shape[0] == 2 and frames.shape[2] >= 2 * 4 * 16      # 2 frames, 2 columns of 64 px
    assert all("_video" not in r for r in report["results"])


def test_compare_on_a_pipeline_transformer_decodes_with_its_vae(tmp_path):
    """A diffusers transformer in the pipeline layout (pipe/transformer beside pipe/vae), compared on torch
    alone (nothing exported): samples.gif decoded by diffusers' own VAE."""
    from pipelines import save_latte_pipeline

    from vdit_deploy.compare import compare

    pipe = save_latte_pipeline(tmp_path / "pipe")
    report = compare(pipe / "transformer", tmp_path / "r", "torch:fp32", steps=2, batches=[1], seeds=[0],
                     sampler="ddim", repeats=1, progress=False, log=lambda m: None, seq=(1, 16),
                     cond=prompts(tmp_path / "p.safetensors"))
    assert report["files"]["gif"] == "samples.gif", report["notes"]
    assert any(f"decoded by diffusers' {pipe / 'vae'}" in n for n in report["notes"]), report["notes"]


def test_triton_sampler_returns_frames(latte_with_decoder, tmp_path):
    """serve-export of an export with a decoder: the sampler's config has an output frames (B, 3, 2, 16, 16),
    its version folder the decoder graph; the response a request asking for frames gets holds the latents
    and their decode, equal to diffusers' decode of them (1e-4); one asking only for video is not decoded."""
    from tritonclient.grpc.model_config_pb2 import ModelConfig
    from google.protobuf import text_format

    from vdit_deploy.contract import load_null
    from vdit_deploy.decode import Decoder
    from vdit_deploy.export.decoder_export import load_vae, torch_decode
    from vdit_deploy.export.triton import write_triton_repo
    from vdit_deploy.export.triton_python import sample_request, sampler_outputs
    from vdit_deploy.runtimes import open_runtime

    export, vae_dir = latte_with_decoder
    repo = tmp_path / "models"
    notes = write_triton_repo(export, repo, backend="python", sampler_instances=1)
    assert any("output frames [3, 2, 16, 16]" in n for n in notes), notes
    config = text_format.Parse((repo / "vdit_sampler" / "config.pbtxt").read_text(), ModelConfig())
    assert [(o.name, list(o.dims)) for o in config.output] == [("video", [-1, 4, 2, 8, 8]),
                                                               ("frames", [-1, 3, 2, 16, 16])]
    assert config.parameters["decoder"].string_value == "decoder.onnx"
    version = repo / "vdit_sampler" / "1"
    assert (version / "decoder.onnx").read_bytes() == (export / "decoder.onnx").read_bytes()

    decoder = Decoder(version)                      # what SamplerModel.initialize loads from its folder
    cond = {"encoder_hidden_states": np.random.default_rng(1).standard_normal((2, 16, 32), dtype=np.float32)}
    with open_runtime("ort", export) as rt:
        video = sample_request(rt.denoise, rt.contract, cond, load_null(rt.contract, version), seed=2,
                               sampler="ddim", steps=2)
    assert set(sampler_outputs(video, decoder, ["video"])) == {"video"}
    outs = sampler_outputs(video, decoder, ["video", "frames"])
    assert outs["frames"].shape == (2, 3, 2, 16, 16) and outs["video"] is video
    vae, _, _ = load_vae(vae_dir)
    ref = torch_decode(vae, video, decoder.meta)
    assert np.abs(outs["frames"] - ref).max() < 1e-4
    assert set(sampler_outputs(video, None, ["frames"])) == {"video"}     # no decoder: latents only
