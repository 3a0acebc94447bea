"""The VAE decoder on TensorRT: `vdit build` builds decoder.onnx (+ decoder-chunk.onnx) beside the denoiser's
engines, and `--runtime trt` decodes on them, or on ONNX Runtime with a one-line note when there is none.

API conformance and control flow only, against the strict fakes generated from the recorded TensorRT and
cuda-python APIs (tests/trt_fake.py; see tests/test_trt_api.py): none of this computes a number. The
numerics are benchmarks/gpu_check.sh's, on a GPU with TensorRT."""
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("diffusers", reason="pip install 'vdit-deploy[dev]' for the diffusers model tests")

from pipelines import tiny_vae  # noqa: E402
from trt_fake import World, install  # noqa: E402

TRT_10_3, TRT_11 = "10.3.0", "11.4.0.106"


def fake(monkeypatch, version=TRT_10_3):
    return install(monkeypatch, version, "12.9.10", World())


def with_decoder(export, root, kind):
    """A copy of a Latte export (latents 4x2x8x8) with a tiny VAE's decoder graphs beside it."""
    from vdit_deploy.export.decoder_export import export_decoder

    out = shutil.copytree(export, root / f"export-{kind}")
    tiny_vae(kind).save_pretrained(root / f"vae-{kind}")
    export_decoder(root / f"vae-{kind}", out)
    return out


@pytest.fixture(scope="module")
def kl_export(tiny_latte_export, tmp_path_factory):
    return with_decoder(tiny_latte_export, tmp_path_factory.mktemp("trt-decoder"), "kl")


@pytest.fixture
def export(kl_export, tmp_path):
    return shutil.copytree(kl_export, tmp_path / "export")


@pytest.mark.parametrize("version", [TRT_10_3, TRT_11])
def test_build_includes_the_decoder(monkeypatch, export, version):
    """`vdit build` of an export with an AutoencoderKL decoder builds it third, its profile the rows of one
    video's latent frames (1..2) and the latent from 1 px (border tiles) to the whole 8x8 (untiled), opt =
    max; keyed by the VAE's weights; `--no-build` then finds all three cached."""
    from vdit_deploy.cli import main
    from vdit_deploy.decode import read_decoder_meta
    from vdit_deploy.runtimes.trt_build import build_export

    world = fake(monkeypatch, version)
    precision = "fp32" if version == TRT_11 else "fp16"        # 11's fp16 needs fp16 graphs (strong typing)
    built = build_export(export, precision, batch="1:2:4", log=lambda m: None)
    assert [b.kind for b in built] == ["step", "denoiser", "decoder"]
    assert str(built[2].profile) == "1:2:2 h=1:8:8 w=1:8:8" and built[2].precision == precision
    assert world.builds[2]["profiles"] == [{"z": ((1, 4, 1, 1), (2, 4, 8, 8), (2, 4, 8, 8))}]
    assert built[2].engine.key.contract == f"vae:{read_decoder_meta(export / 'decoder.onnx').checkpoint_sha256}"
    assert built[2].engine.path.name.startswith(f"decoder.{precision}.b1-2-2.h1-8-8.w1-8-8")
    if version == TRT_10_3:                                    # fp16: the decoder's GroupNorms pinned to fp32
        assert world.builds[2]["precisions"]
    cached = CliRunner().invoke(main, ["build", str(export), "--precision", precision, "--batch", "1:2:4",
                                       "--no-build"])
    assert cached.exit_code == 0 and cached.stdout.count("cached, up to date") == 3, cached.output
    assert "decoder " in cached.stdout
    # int8 denoisers get an fp16 decoder (no Q/DQ VAE); TensorRT 11 without decoder.fp16.onnx: a note, no decoder
    from vdit_deploy.runtimes.trt_build import decoder_engines, decoder_precision
    from vdit_deploy.runtimes.trt_network import BuildOptions

    assert decoder_precision("int8") == decoder_precision("best") == "fp16"
    if version == TRT_11:
        notes = []
        assert decoder_engines(export, "fp16", (4, 2, 8, 8), None, BuildOptions(), log=notes.append) == []
        assert len(notes) == 1 and "decoder.fp16.onnx" in notes[0] and "decodes on ONNX Runtime" in notes[0]


def test_decoder_profile_follows_the_tile(kl_export):
    """With a tile (the target's vae_tile), h and w span 1 .. the latent tile; a latent no larger than one
    tile is decoded whole (diffusers tiles only larger latents)."""
    from vdit_deploy.decode import read_decoder_meta
    from vdit_deploy.runtimes.trt_build import decoder_profile

    meta = read_decoder_meta(kl_export / "decoder.onnx")
    assert str(decoder_profile(meta, (4, 16, 96, 64), tile=64)) == "1:16:16 h=1:32:32 w=1:32:32"
    assert str(decoder_profile(meta, (4, 2, 8, 8), tile=64)) == "1:2:2 h=1:8:8 w=1:8:8"


def test_trt_decoder_runs_the_engine_in_profile_slices(monkeypatch, export):
    """TrtDecoder on the built engine: 3 videos x 2 latent frames = 6 rows go through the engine 2 at a time
    (the profile's largest batch), each upload of 2 rows; closing frees every device buffer and the stream."""
    from vdit_deploy.runtimes.trt_build import build_export
    from vdit_deploy.runtimes.trt_decoder import TrtDecoder

    world = fake(monkeypatch)
    build_export(export, "fp16", batch="1:2:4", log=lambda m: None)
    decoder = TrtDecoder(export, "fp16")
    assert [p.parent.name for p in decoder.files] == ["engines"] and "TensorRT fp16" in decoder.describe()
    z_ptr = decoder.first.buffers["z"]
    before = len(world.launches)
    video = decoder.decode(np.zeros((3, 4, 2, 8, 8), np.float32))
    assert [kind for kind, _ in world.launches[before:]] == ["execute"] * 3
    assert [n for p, n in world.uploads if p == z_ptr][-3:] == [2 * 4 * 8 * 8 * 4] * 3
    assert video.shape[:3] == (3, 3, 2)          # (B, 3, F'): the fake computes no pixels, nor their sizes
    decoder.close()
    assert world.leaks() == {}


def test_runtime_trt_without_a_decoder_engine_decodes_on_ort(monkeypatch, export):
    """`--runtime trt` on an export whose decoder has no engine (built before the decoder was exported):
    one note naming the `vdit build` to run, and the ONNX Runtime decoder."""
    from vdit_deploy.decode import Decoder
    from vdit_deploy.generate import video_decoder
    from vdit_deploy.runtimes.trt_decoder import TrtDecoder

    fake(monkeypatch)
    notes = []
    decoder = video_decoder("a.mp4", "trt", export, (4, 2, 8, 8), precision="fp16", log=notes.append)
    assert type(decoder) is Decoder and len(notes) == 1, notes
    assert notes[0].startswith("note: decoding on ONNX Runtime: ") and "vdit build" in notes[0] and "\n" not in notes[0]
    from vdit_deploy.runtimes.trt_build import build_export

    build_export(export, "fp16", batch="1:2:4", log=lambda m: None)
    decoder = video_decoder("a.mp4", "trt", export, (4, 2, 8, 8), precision="fp16", log=notes.append)
    assert isinstance(decoder, TrtDecoder) and len(notes) == 1
    decoder.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wan", "cogvideox"])
def test_causal_decoder_builds_with_its_cache_profiles(monkeypatch, tiny_latte_export, tmp_path, kind):
    """A causal decoder (feature cache as I/O): decoder.onnx and decoder-chunk.onnx both build, one video
    per call, every cache input's spatial range the latent's times its resolution factor; TrtDecoder loads
    both engines and frees them."""
    from vdit_deploy.export.variants import DECODER_CHUNK
    from vdit_deploy.decode import read_decoder_meta
    from vdit_deploy.runtimes.trt_build import build_export
    from vdit_deploy.runtimes.trt_decoder import TrtDecoder

    export = with_decoder(tiny_latte_export, tmp_path, kind)
    world = fake(monkeypatch)
    built = build_export(export, "fp32", batch="1:2:4", log=lambda m: None)
    assert [b.kind for b in built] == ["step", "denoiser", "decoder", DECODER_CHUNK]
    chunk = read_decoder_meta(export / "decoder-chunk.onnx")
    profile = world.builds[3]["profiles"][0]
    assert profile["z"][0][0] == profile["z"][2][0] == 1 and profile["z"][2][-2:] == (8, 8)
    caches = [spec for spec in chunk.io["inputs"] if spec["name"] != "z"]
    assert caches and len(profile) == 1 + len(caches)
    for spec in caches:
        *fixed, h, w = spec["shape"]
        k = h // 5
        assert profile[spec["name"]] == ((*fixed, k, k), (*fixed, 8 * k, 8 * k), (*fixed, 8 * k, 8 * k))
    decoder = TrtDecoder(export, "fp32")
    assert len(decoder.files) == 2
    decoder.close()
    assert world.leaks() == {}


# ---- on a GPU with TensorRT (benchmarks/gpu_check.sh runs `pytest -m gpu`) ----------------------------------
def _gpu_reason():
    from conftest import trt_skip_reason

    return trt_skip_reason()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["kl", "wan", "cogvideox"])
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("fp16", 3e-2)])
def test_trt_decode_equals_ort(tiny_latte_export, tmp_path, kind, precision, tol):
    """Numerics: the decoder's engines decode what decoder.onnx decodes in ONNX Runtime (CPU), untiled and
    in 8-pixel tiles (blended on the host alike), within fp32 / fp16 relative L2."""
    reason = _gpu_reason()
    if reason is not None:
        pytest.skip(reason)
    from vdit_deploy.decode import Decoder
    from vdit_deploy.runtimes.trt_build import build_export
    from vdit_deploy.runtimes.trt_decoder import TrtDecoder

    export = with_decoder(tiny_latte_export, tmp_path, kind)
    build_export(export, precision, batch="1:2:4", log=lambda m: None)
    z = np.random.default_rng(0).standard_normal((2, 4, 2, 8, 8)).astype(np.float32)
    for tile in (None, 8 if kind == "kl" else 16):
        ref = Decoder(export, providers=["cpu"], tile=tile).decode(z)
        decoder = TrtDecoder(export, precision, tile=tile)
        got = decoder.decode(z)
        decoder.close()
        assert got.shape == ref.shape
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < tol, (kind, precision, tile)
