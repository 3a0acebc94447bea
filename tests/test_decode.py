"""The VAE decoder stage: exported decoders decode what diffusers decodes (untiled and tiled), metadata is
checked, fp16, the plan counts it, `vdit sample` decodes through it or refuses with a hint."""
import json

import numpy as np
import pytest

pytest.importorskip("diffusers", reason="pip install 'vdit-deploy[dev]' for the diffusers model tests")

from pipelines import tiny_vae  # noqa: E402

from vdit_deploy.cli import main  # noqa: E402


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def kl_export(tmp_path_factory):
    from vdit_deploy.export.decoder_export import export_decoder

    root = tmp_path_factory.mktemp("kl")
    tiny_vae("kl").save_pretrained(root / "vae")
    export_decoder(root / "vae", root / "out")
    return root


def check_decoder(root, latent, tile):
    """ORT vs diffusers: untiled to 1e-4, tiled to 1e-4 against diffusers' tiled decode, and the tiling's
    own error no larger than diffusers' (same blending)."""
    from vdit_deploy.decode import Decoder
    from vdit_deploy.export.decoder_export import load_vae, torch_decode

    vae, _, _ = load_vae(root / "vae")
    x = np.random.default_rng(1).standard_normal((1, *latent), dtype=np.float32)
    full, tiled = Decoder(root / "out", providers=["cpu"]), Decoder(root / "out", providers=["cpu"], tile=tile)
    assert tiled.tile[0] == tile                               # a size whose tiles meet exactly
    ref_full, ref_tiled = torch_decode(vae, x, full.meta, 0), torch_decode(vae, x, full.meta, tiled.tile)
    got_full, got_tiled = full.decode(x), tiled.decode(x)
    assert got_full.shape == ref_full.shape and got_tiled.shape == ref_full.shape
    assert np.abs(got_full - ref_full).max() < 1e-4
    assert np.abs(got_tiled - ref_tiled).max() < 1e-4
    assert np.abs(ref_tiled - ref_full).max() > 1e-3          # the tiles really were blended
    assert rel(got_tiled, got_full) <= rel(ref_tiled, ref_full) * 1.01 + 1e-6
    return got_full


def test_kl_decoder_matches_diffusers(kl_export):
    from vdit_deploy.decode import read_decoder_meta

    meta = read_decoder_meta(kl_export / "out" / "decoder.onnx")
    assert meta.layout == "frames" and meta.scale == [pytest.approx(1 / 0.18215)] * 4 and meta.ratio == 2
    video = check_decoder(kl_export, (4, 2, 10, 9), tile=8)
    assert video.shape == (1, 3, 2, 20, 18)


@pytest.mark.slow
@pytest.mark.parametrize("kind,latent,tile,frames_out,ratio", [("wan", (4, 3, 6, 5), 16, 5, 4),
                                                               ("wan22", (4, 3, 6, 5), 32, 5, 8),
                                                               ("cog", (4, 5, 8, 7), 24, 9, 4),
                                                               ("ltx", (4, 3, 10, 9), 32, 9, 4)])
def test_video_vaes_match_diffusers(kind, latent, tile, frames_out, ratio, tmp_path):
    """Wan's feat_cache and CogVideoX's conv_cache cross chunk boundaries as graph inputs/outputs; LTX in one graph."""
    from vdit_deploy.decode import read_decoder_meta
    from vdit_deploy.export.decoder_export import export_decoder

    tiny_vae(kind).save_pretrained(tmp_path / "vae")
    export_decoder(tmp_path / "vae", tmp_path / "out", frames=latent[1])
    if kind == "ltx":                       # non-causal: one graph for the clip
        meta = read_decoder_meta(tmp_path / "out" / "decoder.onnx")
        assert meta.layout == "video" and meta.scale == [1.0, 2.0, 0.5, 1.5] and meta.bias[0] == pytest.approx(0.1)
    else:
        meta = read_decoder_meta(tmp_path / "out" / "decoder-chunk.onnx")
        assert meta.layout == "causal" and meta.cache > 0
    assert meta.frames_out(latent[1]) == frames_out
    video = check_decoder(tmp_path, latent, tile=tile)
    assert video.shape == (1, 3, frames_out, ratio * latent[2], ratio * latent[3])


def test_decoder_metadata_edits_and_pickles_are_refused(kl_export, tmp_path):
    import onnx

    from vdit_deploy.decode import read_decoder_meta
    from vdit_deploy.errors import VditError
    from vdit_deploy.export.decoder_export import load_vae

    model = onnx.load(str(kl_export / "out" / "decoder.onnx"))
    for p in model.metadata_props:
        if p.key == "vdit.decoder":
            dec = json.loads(p.value)
            dec["scale"] = [1.0] * 4
            p.value = json.dumps(dec)
    onnx.save(model, str(tmp_path / "decoder.onnx"))
    with pytest.raises(VditError, match="edited after export"):
        read_decoder_meta(tmp_path / "decoder.onnx")
    bad = tmp_path / "vae"
    bad.mkdir()
    (bad / "config.json").write_text((kl_export / "vae" / "config.json").read_text())
    (bad / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(VditError, match="pickle files are never loaded"):
        load_vae(bad)


def test_decoder_fp16_and_verify(kl_export):
    from vdit_deploy.export.decoder_verify import convert_decoder_fp16, verify_decoder

    written = convert_decoder_fp16(kl_export / "out")
    assert [p.name for p in written] == ["decoder.fp16.onnx"]
    rows = {r.graph: r for r in verify_decoder(kl_export / "out")}
    assert set(rows) == {"decoder.onnx", "decoder.onnx tile 8", "decoder.fp16.onnx", "decoder.fp16.onnx tile 8"}
    assert all(r.ok for r in rows.values()), {k: r.error for k, r in rows.items()}
    assert rows["decoder.onnx"].error < 1e-5 < rows["decoder.fp16.onnx"].error


def test_plan_counts_the_decoder_and_sample_decodes(tiny_latte_export, kl_export, tmp_path, capsys):
    import shutil

    import imageio.v3 as iio

    from vdit_deploy.export.decoder_export import export_decoder

    export = tmp_path / "latte"
    shutil.copytree(tiny_latte_export, export)
    export_decoder(kl_export / "vae", export)
    with pytest.raises(SystemExit) as e:
        main(["plan", "--target", "orin-nano", "--onnx", str(export)])
    out = capsys.readouterr().out
    assert e.value.code in (0, None), out
    assert "decoder weights (fp16)" in out and "decoder activations (tile 256 px)" in out
    from safetensors.numpy import save_file

    cond = tmp_path / "cond.safetensors"
    save_file({"encoder_hidden_states": np.random.default_rng(0).standard_normal((1, 16, 32), dtype=np.float32)},
              str(cond))
    with pytest.raises(SystemExit) as e:    # a 4-channel latent model's MP4, decoded by decoder.onnx
        main(["sample", "--runtime", "ort", "--onnx", str(export), "--cond", str(cond), "--steps", "3",
              "--out", str(tmp_path / "v.mp4")])
    assert e.value.code in (0, None) and "decoded by the VAE" in capsys.readouterr().out
    assert iio.imread(tmp_path / "v.mp4").shape[:1] == (2,)        # the latents' 2 frames, decoded


def test_sample_refuses_latent_video_without_decoder(tiny_latte_export, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--runtime", "ort", "--onnx", str(tiny_latte_export), "--out", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "vdit export-decoder" in err[0]
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.gpu
def test_decoder_on_ort_cuda_matches_cpu(kl_export):
    """The decoder on the CUDA execution provider (what `--runtime ort` picks on a GPU) decodes what the CPU
    decodes, tiled too (onnxruntime-gpu needed)."""
    import onnxruntime as ort

    from vdit_deploy.decode import Decoder

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed (pip install 'vdit-deploy[gpu]')")
    x = np.random.default_rng(2).standard_normal((2, 4, 2, 10, 9), dtype=np.float32)
    for tile in (0, 8):
        cpu = Decoder(kl_export / "out", providers=["cpu"], tile=tile).decode(x)
        cuda = Decoder(kl_export / "out", providers=["cuda"], tile=tile).decode(x)
        assert rel(cuda, cpu) < 1e-4
