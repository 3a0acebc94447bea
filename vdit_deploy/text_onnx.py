"""The pipeline's text encoder as ONNX, for an edge box without torch: text_encoder.onnx beside the graphs.

    text_encoder.onnx             (input_ids int64 (1, L), attention_mask int64 (1, L)) -> hidden (1, L, D), L
                                  the pipeline's padded length (PromptRule.max_length), fp32
    text_encoder.tokenizer.json   the tokenizer as the `tokenizers` library reads it (no transformers, no torch)
Its metadata holds the prompt rule and the encoder digest, so prompts it encodes land in the same prompt
cache entries as `vdit encode` on the host (text_encoder.py). export_text_encoder verifies the graph
against transformers on a few prompts before it is written.

--precision (TOLERANCE: what the check allows; the graph keeps float32 inputs and outputs):
    fp32  max abs difference within 1e-4 x max |hidden|
    fp16  weights and math in fp16, LayerNorm-style reductions, Softmax, Pow and Exp kept fp32
          (calibration/fp16.py's rule); relative L2 <= 1e-2. T5's feed-forward activations can overflow
          fp16 in large checkpoints: the check refuses such a graph rather than write it
    int8  INT8 weights (ONNX Runtime's dynamic quantization: MatMul weights per channel, the embedding
          table), activations quantized per call; relative L2 <= 5e-2
An fp16 or int8 encoder fills the same prompt cache entries as the host's fp32 (same rule and digest):
its embeddings differ from them by at most the tolerance it was checked to.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.export.variants import FP16, FP32, INT8, TEXT_ENCODER, variant_file
from vdit_deploy.text_encoder import PromptRule, TextEncoder

TOKENIZER_FILE = "text_encoder.tokenizer.json"
CHECK_PROMPTS = ("a cat playing piano", "", "waves at sunset on the beach, a red car in the city at night")
TOLERANCES = {FP32: 1e-4, FP16: 1e-2, INT8: 5e-2}      # max abs / max |hidden| for fp32, relative L2 otherwise


class OnnxTextEncoder:
    """text_encoder.onnx + its tokenizer in ONNX Runtime: the TextEncoder surface (rule, info, embed, encode)."""

    encode = TextEncoder.encode

    def __init__(self, export_dir, providers=None, graph: Path | None = None):
        import onnx

        path = graph or Path(export_dir) / variant_file(TEXT_ENCODER)
        if not path.is_file():
            raise VditError(f"{export_dir} has no {path.name}; run `vdit export-text-encoder` first")
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        try:
            info = json.loads(props["vdit.text_encoder"])
            PromptRule(**info["rule"])
        except (KeyError, ValueError, TypeError):
            raise VditError(f"{path} is not a vdit text encoder graph (no vdit.text_encoder metadata)") from None
        self.load(path, Path(export_dir) / TOKENIZER_FILE, info, providers)

    def load(self, path: Path, tokenizer_file: Path, info: dict, providers=None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from vdit_deploy.runtimes.ort_runtime import resolve_providers

        self.info, self.rule = info, PromptRule(**info["rule"])
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.enable_truncation(self.rule.max_length)
        self.tokenizer.enable_padding(length=self.rule.max_length, pad_id=int(info["pad_id"]),
                                      pad_token=info["pad_token"])
        from vdit_deploy.threads import session_options

        self.session = ort.InferenceSession(str(path), session_options(), providers=resolve_providers(providers))

    def ids(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer.encode(text)
        return np.array([enc.ids], np.int64), np.array([enc.attention_mask], np.int64)

    def embed(self, text: str) -> tuple[np.ndarray, int]:
        ids, mask = self.ids(text)
        feeds = {"input_ids": ids, "attention_mask": mask if self.rule.mask else np.ones_like(mask)}
        return self.session.run(None, feeds)[0].astype(np.float32), int(mask.sum())


def _module(model, use_mask: bool):
    """forward(input_ids, attention_mask) -> last hidden state, the mask passed as the pipeline passes it."""
    import torch

    class TextModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids, attention_mask=attention_mask if use_mask else None)[0]

    return TextModule().eval()


def _reduced(src: Path, out: Path, precision: str, large: bool) -> None:
    """The fp32 graph at src -> out in fp16 or with INT8 weights (float32 I/O kept; weights in
    <out>.data when large)."""
    import onnx

    if precision == FP16:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        from vdit_deploy.calibration.fp16 import FP32_OPS, drop_round_trips

        model = drop_round_trips(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True,
                                                          op_block_list=DEFAULT_OP_BLOCK_LIST + list(FP32_OPS)))
    else:
        from onnxruntime.quantization import quantize_dynamic

        from vdit_deploy.runtimes.cpu_isa import META_KEY, choose

        # this CPU's INT8 types, as for the denoiser: 7-bit weights where u8 x s8 sums saturate (AVX2)
        choice = choose("dynamic")
        quantize_dynamic(str(src), str(out), weight_type=choice.quant_type("weight"), per_channel=True,
                         reduce_range=choice.reduce_range, op_types_to_quantize=["MatMul", "Gather"],
                         use_external_data_format=large, extra_options={"MatMulConstBOnly": True})
        model = onnx.load(str(out))
        del model.metadata_props[:]                              # the source's, set again
        for prop in onnx.load(str(src), load_external_data=False).metadata_props:
            model.metadata_props.add(key=prop.key, value=prop.value)
        model.metadata_props.add(key=META_KEY, value=choice.to_json())
    onnx.save(model, str(out), save_as_external_data=large, all_tensors_to_one_file=True,
              location=out.name + ".data")


def export_text_encoder(pipeline_dir, out_dir, opset: int = 18, precision: str = FP32,
                        tolerance: float | None = None) -> tuple[Path, dict]:
    """pipeline_dir's text_encoder/ + tokenizer/ -> out_dir/text_encoder.onnx + its tokenizer.json at
    `precision` (fp32, fp16, int8), refused unless ONNX Runtime matches transformers on CHECK_PROMPTS
    within `tolerance` (TOLERANCES). -> (path, the measured max_abs, rel_l2 and cosine, worst prompt)."""
    import tempfile

    import torch

    from vdit_deploy.export.onnx_export import _check_saved, _trace
    from vdit_deploy.files import atomic_path, check_output

    if precision not in TOLERANCES:
        raise VditError(f"--precision of a text encoder is one of {', '.join(TOLERANCES)}, got {precision!r}")
    tolerance = TOLERANCES[precision] if tolerance is None else tolerance
    out_dir = Path(out_dir)
    path = out_dir / variant_file(TEXT_ENCODER)
    check_output(path)
    host = TextEncoder(pipeline_dir)
    tok = host.tokenizer
    if not getattr(tok, "is_fast", False) or not hasattr(tok, "backend_tokenizer"):
        raise VditError(f"{pipeline_dir}/tokenizer has no fast tokenizer: the edge box needs tokenizer.json")
    module = _module(host.model, host.rule.mask)
    ids = tok(["a"], padding="max_length", max_length=host.rule.max_length, truncation=True, return_tensors="pt")
    program = _trace(module, (ids.input_ids, ids.attention_mask), ["input_ids", "attention_mask"], ["hidden"],
                     None, opset)
    info = {**host.info, "pad_id": int(tok.pad_token_id), "pad_token": str(tok.pad_token), "precision": precision}
    program.model.metadata_props.update({"vdit.kind": TEXT_ENCODER, "vdit.text_encoder": json.dumps(info)})
    large = sum(p.numel() for p in host.model.parameters()) * 4 > 1.8e9      # protobuf's 2 GB: weights beside it
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / TOKENIZER_FILE) as tmp:
        tok.backend_tokenizer.save(str(tmp))
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".text_encoder.") as work:   # the graph (+ .data)
        written = Path(work) / path.name                 # under its own name: external data refers to it
        if precision == FP32:
            program.save(str(written), external_data=large)
        else:
            (Path(work) / "fp32").mkdir()
            fp32 = Path(work) / "fp32" / path.name
            program.save(str(fp32), external_data=large)
            _reduced(fp32, written, precision, large)
        _check_saved(written)
        edge = OnnxTextEncoder.__new__(OnnxTextEncoder)          # the written pair, checked before the move
        edge.load(written, out_dir / TOKENIZER_FILE, info, ["cpu"])
        stats = {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0}
        scale = 0.0
        with torch.no_grad():
            for text in CHECK_PROMPTS:
                (got, n), (ref, n_ref) = edge.embed(text), host.embed(text)
                if n != n_ref:
                    raise VditError(f"the tokenizer.json tokenizes {text!r} to {n} tokens, transformers to {n_ref}")
                scale = max(scale, float(np.abs(ref).max()))
                stats["max_abs"] = max(stats["max_abs"], float(np.abs(got - ref).max()))
                stats["rel_l2"] = max(stats["rel_l2"], float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12)))
                stats["cosine"] = min(stats["cosine"], float((got * ref).sum() / max(
                    np.linalg.norm(got) * np.linalg.norm(ref), 1e-12)))
        del edge
        error, what = ((stats["max_abs"] / max(scale, 1.0), "max abs / max |hidden|") if precision == FP32
                       else (stats["rel_l2"], "relative L2"))
        if not np.isfinite(error) or error > tolerance:
            raise VditError(f"text_encoder.onnx ({precision}) differs from transformers by {what} {error:.2e} "
                            f"(> {tolerance:g}); not written")
        data = written.with_name(written.name + ".data")
        stale = path.with_name(path.name + ".data")
        if not data.is_file() and stale.is_file():
            stale.unlink()                               # an earlier export's weights, not this graph's
        for file in (data, written):                     # the weights first: the graph never points at nothing
            if file.is_file():
                os.replace(file, out_dir / file.name)
    return path, stats
