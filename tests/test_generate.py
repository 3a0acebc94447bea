"""Prompt to video: `vdit encode` equals each pipeline's own prompt encoding, the prompt cache, and a tiny
Latte pipeline from prompt to MP4 through ONNX Runtime without torch, its frames diffusers' decode."""
import subprocess
import sys
import types

import numpy as np
import pytest

pytest.importorskip("diffusers", reason="pip install 'vdit-deploy[dev]' for the diffusers model tests")
pytest.importorskip("transformers", reason="the text encoder tests need transformers")

from pipelines import save_latte_pipeline, save_text_encoder  # noqa: E402

from vdit_deploy.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def latte_pipeline(tmp_path_factory):
    return save_latte_pipeline(tmp_path_factory.mktemp("pipe") / "latte")


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    assert e.value.code in (0, None), out.err
    return out.out


def generate_without_torch(export, prompt: str, steps: int, out) -> str:
    """`vdit generate EXPORT --prompt ... --seed 3 --guidance 4` in a process where torch cannot be
    imported -> its stdout, which reports every stage."""
    code = ("import sys; sys.modules['torch'] = None\nfrom vdit_deploy.cli import main\n"
            f"main(['generate', {str(export)!r}, '--prompt', {prompt!r}, '--steps', '{steps}', '--seed', '3',"
            f" '--guidance', '4', '--out', {str(out)!r}])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert all(f"{s} " in run.stdout for s in ("encode", "sample", "decode", "write")), run.stdout
    return run.stdout


def test_encode_equals_latte_pipeline(latte_pipeline, tmp_path):
    """LattePipeline.encode_prompt (mask_feature: one prompt cut to its tokens, a batch zeroed past them)."""
    import diffusers
    import torch

    from vdit_deploy.text_encoder import TextEncoder, cache_info

    pipe = diffusers.LattePipeline.from_pretrained(str(latte_pipeline), use_safetensors=True)
    enc = TextEncoder(latte_pipeline)
    for prompts in (["A cat playing piano"], ["a dog on the beach at sunset", "red car"]):
        with torch.no_grad():
            ref, ref_neg = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt="blue",
                                              clean_caption=False, mask_feature=True, device=torch.device("cpu"))
        cond, null = enc.encode(prompts, "blue", tmp_path / "cache")
        assert cond.shape == tuple(ref.shape) and np.abs(cond - ref.numpy()).max() < 1e-6
        assert np.abs(null - ref_neg[:1].numpy()).max() < 1e-6
    assert cache_info(tmp_path / "cache")["digest"] == enc.digest
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4     # 3 prompts + the negative, once each


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_encode_equals_wan_and_cogvideox(family, tmp_path):
    """_get_t5_prompt_embeds of WanPipeline (umT5, 512 tokens, zeros past the prompt) and CogVideoXPipeline
    (T5, 226 tokens, no mask), called on the same tokenizer and encoder."""
    import json

    import diffusers
    import torch
    from transformers import AutoTokenizer, T5EncoderModel, UMT5EncoderModel

    from vdit_deploy.text_encoder import TextEncoder

    save_text_encoder(tmp_path, 16, umt5=family == "wan")
    cls = {"wan": diffusers.WanPipeline, "cogvideox": diffusers.CogVideoXPipeline}[family]
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": cls.__name__}))
    model = (UMT5EncoderModel if family == "wan" else T5EncoderModel).from_pretrained(tmp_path / "text_encoder")
    fake = types.SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(tmp_path / "tokenizer"),
                                 text_encoder=model.eval(), _execution_device=torch.device("cpu"))
    length = 512 if family == "wan" else 226
    prompts = ["a  cat &amp; dog", "waves"]
    with torch.no_grad():
        ref = cls._get_t5_prompt_embeds(fake, prompts, max_sequence_length=length, device=torch.device("cpu"))
        ref_neg = cls._get_t5_prompt_embeds(fake, [""], max_sequence_length=length, device=torch.device("cpu"))
    cond, null = TextEncoder(tmp_path).encode(prompts, "")
    assert cond.shape == (2, length, 16) and np.abs(cond - ref.numpy()).max() < 1e-6
    assert np.abs(null - ref_neg.numpy()).max() < 1e-6


@pytest.mark.slow
def test_latte_prompt_to_mp4_without_torch(latte_pipeline, tmp_path, capsys):
    """Three commands (export + export-decoder, encode, generate): the video decodes through ONNX Runtime
    with torch unimportable, and its frames equal diffusers' own decode of the same latents."""
    import imageio.v3 as iio

    from vdit_deploy.export.decoder_export import load_vae, torch_decode
    from vdit_deploy.decode import read_decoder_meta
    from vdit_deploy.generate import generate

    export, pipe = tmp_path / "latte", latte_pipeline
    run_cli(["encode", str(pipe), "--prompt", "x", "--negative", "", "--null-out", str(tmp_path / "null.safetensors")],
            capsys)
    run_cli(["export", str(pipe / "transformer"), "--out", str(export), "--batch", "1:2", "--seq", "1:16",
             "--null", str(tmp_path / "null.safetensors"), "--no-verify"], capsys)
    run_cli(["export-decoder", str(pipe / "vae"), "--out", str(export)], capsys)
    out = run_cli(["encode", str(pipe), "--prompt", "a cat playing piano", "--cache", str(export / "prompts")], capsys)
    assert "encoded 1 prompt(s)" in out
    generate_without_torch(export, "a cat playing piano", 4, tmp_path / "a.mp4")
    frames = iio.imread(tmp_path / "a.mp4")
    assert frames.shape[0] == 2 and frames.shape[1] >= 16            # 2 frames of 16x16 (upscaled x4)
    # the same run in the library, to .npy latents, then diffusers decodes them
    latents = tmp_path / "z.npy"
    generate(export, ["a cat playing piano"], latents, steps=4, seed=3, guidance=4, progress=False)
    video = generate(export, ["a cat playing piano"], tmp_path / "v.npy", steps=4, seed=3, guidance=4,
                     progress=False, decode_npy=True)
    vae, _, _ = load_vae(pipe / "vae")
    ref = torch_decode(vae, np.load(latents), read_decoder_meta(export / "decoder.onnx"), 0)
    assert np.abs(np.load(tmp_path / "v.npy") - ref).max() < 1e-4
    assert video.stages[-1].name == "write"


def test_generate_refuses_before_work(latte_pipeline, tiny_latte_export, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tiny_latte_export), "--prompt", "a cat", "--out", str(tmp_path / "a.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "export-decoder" in err[0]
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tiny_latte_export), "--prompt", "a cat", "--out", str(tmp_path / "a.npy")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "no prompt cache" in err[0], err
    assert not list(tmp_path.iterdir())


def test_text_encoder_onnx_encodes_without_torch(latte_pipeline, tmp_path, capsys):
    """text_encoder.onnx + tokenizer.json (tokenizers, ONNX Runtime) give `vdit encode`'s embeddings, with
    torch unimportable, into the same cache entries."""
    from safetensors.numpy import load_file

    from vdit_deploy.text_encoder import TextEncoder

    out = run_cli(["export-text-encoder", str(latte_pipeline), "--out", str(tmp_path)], capsys)
    assert "max abs difference from transformers" in out
    code = ("import sys; sys.modules['torch'] = None\nfrom safetensors.numpy import save_file\n"
            "from vdit_deploy.text_onnx import OnnxTextEncoder\n"
            f"cond, null = OnnxTextEncoder({str(tmp_path)!r}).encode(['A dog on the beach'], 'blue', {str(tmp_path / 'c')!r})\n"
            f"save_file({{'cond': cond, 'null': null}}, {str(tmp_path / 'edge.safetensors')!r})")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    edge = load_file(str(tmp_path / "edge.safetensors"))
    cond, null = TextEncoder(latte_pipeline).encode(["A dog on the beach"], "blue", tmp_path / "c")   # cache hits
    assert np.abs(edge["cond"] - cond).max() < 1e-5 and np.abs(edge["null"] - null).max() < 1e-5
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 2


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_text_encoder_fp16_and_int8(latte_pipeline, tmp_path, capsys, precision):
    """`vdit export-text-encoder --precision fp16|int8`: the weights are fp16 / INT8 in the graph, its
    embeddings match transformers within the check's relative L2 (fp16 1e-2, int8 5e-2), the edge
    encoder fills the host's cache entries; a tolerance the graph misses refuses it with nothing written."""
    import onnx

    from vdit_deploy.errors import VditError
    from vdit_deploy.text_encoder import TextEncoder
    from vdit_deploy.text_onnx import OnnxTextEncoder, export_text_encoder

    out = run_cli(["export-text-encoder", str(latte_pipeline), "--out", str(tmp_path), "--precision", precision],
                  capsys)
    assert f"({precision}," in out and "relative L2" in out and "cosine" in out
    graph = onnx.load(str(tmp_path / "text_encoder.onnx"))
    types = {init.data_type for init in graph.graph.initializer if len(init.dims) == 2}
    assert (onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.INT8) in types
    assert [i.type.tensor_type.elem_type for i in graph.graph.output] == [onnx.TensorProto.FLOAT]
    if precision == "int8":     # this CPU's types (7-bit weights on AVX2, where full-range s8 saturates)
        from vdit_deploy.runtimes.cpu_isa import META_KEY, choose

        meta = {p.key: p.value for p in graph.metadata_props}
        assert meta[META_KEY] == choose("dynamic").to_json()
    edge = OnnxTextEncoder(tmp_path)
    assert edge.info["precision"] == precision
    cond, null = edge.encode(["A dog on the beach"], "blue", tmp_path / "c")
    ref, ref_null = TextEncoder(latte_pipeline).encode(["A dog on the beach"], "blue")
    tol = {"fp16": 1e-2, "int8": 5e-2}[precision]
    for got, want in ((cond, ref), (null, ref_null)):
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol
    with pytest.raises(VditError, match=rf"text_encoder.onnx \({precision}\) differs from transformers by relative "
                                        r"L2 .*; not written"):
        export_text_encoder(latte_pipeline, tmp_path / "strict", precision=precision, tolerance=1e-9)
    assert [p.name for p in (tmp_path / "strict").iterdir()] == ["text_encoder.tokenizer.json"]
