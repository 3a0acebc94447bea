"""The pipeline's text encoder as ONNX, for an edge box without torch: text_encoder.onnx beside the graphs.

    text_encoder.onnx             (input_ids int64 (1, L), attention_mask int64 (1, L)) -> hidden (1, L, D), L
                                  the pipeline's padded length (PromptRule.max_length), fp32
    text_encoder.tokenizer.json   the tokenizer as the `tokenizers` library reads it (no transformers, no torch)
Its metadata holds the prompt rule and the encoder digest, so prompts it encodes land in the same prompt
cache entries as `vdit encode` on the host (text_encoder.py). export_text_encoder verifies the graph
against transformers on a few prompts before it is written.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.export.variants import TEXT_ENCODER, variant_file
from vdit_deploy.text_encoder import PromptRule, TextEncoder

TOKENIZER_FILE = "text_encoder.tokenizer.json"
CHECK_PROMPTS = ("a cat playing piano", "", "waves at sunset on the beach, a red car in the city at night")


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


def export_text_encoder(pipeline_dir, out_dir, opset: int = 18, tolerance: float = 1e-4) -> tuple[Path, float]:
    """pipeline_dir's text_encoder/ + tokenizer/ -> out_dir/text_encoder.onnx + its tokenizer.json; refused
    unless ONNX Runtime matches transformers (max abs over CHECK_PROMPTS within tolerance x max |hidden|).
    -> (path, the measured max abs difference)."""
    import torch

    from vdit_deploy.export.onnx_export import _check_saved, _trace
    from vdit_deploy.files import atomic_path, check_output

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
    info = {**host.info, "pad_id": int(tok.pad_token_id), "pad_token": str(tok.pad_token)}
    program.model.metadata_props.update({"vdit.kind": TEXT_ENCODER, "vdit.text_encoder": json.dumps(info)})
    large = sum(p.numel() for p in host.model.parameters()) * 4 > 1.8e9      # protobuf's 2 GB: weights beside it
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / TOKENIZER_FILE) as tmp:
        tok.backend_tokenizer.save(str(tmp))
    with atomic_path(path) as tmp:
        program.save(str(tmp), external_data=large)
        _check_saved(tmp)
        edge = OnnxTextEncoder.__new__(OnnxTextEncoder)          # the written pair, checked before the rename
        edge.load(tmp, out_dir / TOKENIZER_FILE, info, ["cpu"])
        worst, scale = 0.0, 0.0
        with torch.no_grad():
            for text in CHECK_PROMPTS:
                (got, n), (ref, n_ref) = edge.embed(text), host.embed(text)
                if n != n_ref:
                    raise VditError(f"the tokenizer.json tokenizes {text!r} to {n} tokens, transformers to {n_ref}")
                worst, scale = max(worst, float(np.abs(got - ref).max())), max(scale, float(np.abs(ref).max()))
        if worst > tolerance * max(scale, 1.0):
            raise VditError(f"text_encoder.onnx differs from transformers by {worst:.2e} (> {tolerance:g} x "
                            f"{max(scale, 1.0):.2g}); not written")
    return path, worst
