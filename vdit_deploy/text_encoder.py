"""Prompts -> the denoiser's text conditioning, as the model's own pipeline makes it, with a prompt cache.

The pipeline's text_encoder/ (T5EncoderModel, UMT5EncoderModel; safetensors only) and tokenizer/ run
with transformers on the host. How each pipeline pads and masks (read from diffusers' encode_prompt /
_get_t5_prompt_embeds) is a PromptRule, chosen by model_index.json's _class_name:
    LattePipeline      120 tokens, mask to the encoder, lower-cased; mask_feature: one prompt is cut to
                       its own tokens (the negative to the same count), several are zeroed past theirs
    WanPipeline        512 tokens (its __call__'s max_sequence_length), mask to the encoder, prompt_clean,
                       embeddings past each prompt's tokens set to zero
    CogVideoXPipeline  226 tokens, no mask
The negative prompt (default "") is the null conditioning guidance pairs with the prompt.

The cache is a directory: encoder.json (the rule and a digest of the encoder's and tokenizer's files)
and one <sha256 of rule + digest + text>.safetensors per text, holding the encoder's padded output and
its token count. Reading it needs no torch, so an edge box encodes nothing: `vdit generate` finds its
prompts there.
"""
from __future__ import annotations

import hashlib
import html
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vdit_deploy.errors import VditError

ENCODER_CLASSES = ("T5EncoderModel", "UMT5EncoderModel")
CACHE_INFO = "encoder.json"
COND_NAME = "encoder_hidden_states"     # what Latte, Wan and CogVideoX transformers take


@dataclass(frozen=True)
class PromptRule:
    max_length: int
    mask: bool             # the attention mask goes to the encoder
    zero_pad: bool         # embeddings past the prompt's tokens are zeros (Wan)
    trim: bool             # Latte's mask_feature
    clean: str             # "lower" (Latte), "wan" (prompt_clean) or "" (as typed)


RULES = {"LattePipeline": PromptRule(120, True, False, True, "lower"),
         "WanPipeline": PromptRule(512, True, True, False, "wan"),
         "CogVideoXPipeline": PromptRule(226, False, False, False, "")}


def pipeline_rule(pipeline_dir) -> PromptRule:
    index = Path(pipeline_dir) / "model_index.json"
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        raise VditError(f"{pipeline_dir} is not a diffusers pipeline directory (no readable model_index.json "
                        "with _class_name)") from None
    if name not in RULES:
        raise VditError(f"{pipeline_dir}: {name} is not a pipeline whose prompts vdit encodes "
                        f"({', '.join(RULES)})")
    return RULES[name]


def clean(text: str, how: str) -> str:
    if how == "lower":
        return text.lower().strip()
    if how == "wan":        # diffusers' prompt_clean: ftfy where installed, html entities, whitespace
        try:
            import ftfy
            text = ftfy.fix_text(text)
        except ImportError:
            pass
        return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()
    return text


def combine(rule: PromptRule, prompts: list, negative) -> tuple[np.ndarray, np.ndarray]:
    """Per text (embeds (1, L, D), tokens) -> (cond (B, L', D), null (1, L', D)) as the pipeline batches them."""
    emb = np.concatenate([e for e, _ in prompts])
    neg, neg_n = negative
    lengths = [n for _, n in prompts]
    if rule.zero_pad:
        emb = emb * (np.arange(emb.shape[1])[None, :, None] < np.array(lengths)[:, None, None])
        neg = neg * (np.arange(neg.shape[1])[None, :, None] < neg_n)
    if rule.trim:                         # mask_text_embeddings: batch 1 is cut, a batch is zeroed
        if len(prompts) == 1:
            emb, neg = emb[:, :lengths[0]], neg[:, :lengths[0]]
        else:
            emb = emb * (np.arange(emb.shape[1])[None, :, None] < np.array(lengths)[:, None, None])
    return np.ascontiguousarray(emb, np.float32), np.ascontiguousarray(neg, np.float32)


# ---- the cache (torch-free) ------------------------------------------------------------------------
def entry_key(info: dict, text: str) -> str:
    return hashlib.sha256(json.dumps([info["rule"], info["digest"], text], sort_keys=True).encode()).hexdigest()


def cache_info(cache_dir) -> dict | None:
    file = Path(cache_dir) / CACHE_INFO
    if not file.is_file():
        return None
    try:
        info = json.loads(file.read_text())
        PromptRule(**info["rule"])
        return info
    except (ValueError, KeyError, TypeError):
        raise VditError(f"{file} is not a vdit prompt cache's encoder.json; delete the cache to rebuild it") from None


def cached(cache_dir, info: dict, text: str):
    """(embeds (1, L, D), tokens) of one text from the cache, or None."""
    from safetensors.numpy import load_file

    file = Path(cache_dir) / f"{entry_key(info, text)}.safetensors"
    if not file.is_file():
        return None
    data = load_file(str(file))
    return data["embeds"], int(data["tokens"][0])


def check_cached(cache_dir, texts: list) -> None:
    """Before any work: every text is in the cache (else a one-line refusal naming the first missing)."""
    info = cache_info(cache_dir)
    if info is None:
        raise VditError(f"no prompt cache at {cache_dir} (no {CACHE_INFO}) and no --pipeline to encode with: run "
                        "`vdit encode PIPELINE --prompt ... --cache DIR` on a host first")
    rule = PromptRule(**info["rule"])
    for text in texts:
        if not (Path(cache_dir) / f"{entry_key(info, clean(text, rule.clean))}.safetensors").is_file():
            raise VditError(f"prompt {text[:60]!r} is not in the cache {cache_dir}: encode it first with "
                            "`vdit encode PIPELINE --prompt ... --cache DIR`")


def from_cache(cache_dir, prompts: list, negative: str = "") -> tuple[np.ndarray, np.ndarray]:
    """The conditioning of these prompts from the cache alone (no torch); a missing text is refused."""
    info = cache_info(cache_dir)
    if info is None:
        raise VditError(f"{cache_dir} is not a prompt cache (no {CACHE_INFO}); make one with "
                        "`vdit encode PIPELINE --prompt ... --cache DIR`")
    rule = PromptRule(**info["rule"])
    entries = []
    for text in [*prompts, negative]:
        entry = cached(cache_dir, info, clean(text, rule.clean))
        if entry is None:
            raise VditError(f"prompt {text[:60]!r} is not in the cache {cache_dir}: encode it first with "
                            "`vdit encode PIPELINE --prompt ... --cache DIR`")
        entries.append(entry)
    return combine(rule, entries[:-1], entries[-1])


# ---- encoding (transformers + torch) ---------------------------------------------------------------
class TextEncoder:
    """A pipeline's text_encoder/ + tokenizer/ on the host: encode(prompts, negative, cache_dir)."""

    def __init__(self, pipeline_dir):
        import torch
        import transformers

        from vdit_deploy.files import sha256_files

        pipeline_dir = Path(pipeline_dir)
        self.rule = pipeline_rule(pipeline_dir)
        enc_dir, tok_dir = pipeline_dir / "text_encoder", pipeline_dir / "tokenizer"
        try:
            config = json.loads((enc_dir / "config.json").read_text())
        except (OSError, ValueError):
            raise VditError(f"{pipeline_dir} has no readable text_encoder/config.json") from None
        arch = (config.get("architectures") or [""])[0]
        if arch not in ENCODER_CLASSES:
            raise VditError(f"{enc_dir}: {arch or 'no architectures'} is not a text encoder vdit runs "
                            f"({', '.join(ENCODER_CLASSES)})")
        weights = sorted(enc_dir.glob("*.safetensors"))
        if not weights:
            raise VditError(f"{enc_dir} has no .safetensors weights (pickle files are never loaded)")
        if not tok_dir.is_dir():
            raise VditError(f"{pipeline_dir} has no tokenizer/ directory")
        self.digest = sha256_files([enc_dir / "config.json", *weights,
                                    *sorted(p for p in tok_dir.iterdir() if p.is_file())])
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
            self.model = getattr(transformers, arch).from_pretrained(str(enc_dir), use_safetensors=True,
                                                                     torch_dtype=torch.float32).eval()
        except Exception as e:
            raise VditError(f"loading {pipeline_dir}'s text encoder failed: {type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}") from None
        self.info = {"rule": asdict(self.rule), "digest": self.digest}

    def embed(self, text: str) -> tuple[np.ndarray, int]:
        """One cleaned text -> (the encoder's output padded to max_length (1, L, D), its token count)."""
        import torch

        ids = self.tokenizer([text], padding="max_length", max_length=self.rule.max_length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        with torch.no_grad():
            if self.rule.mask:
                out = self.model(ids.input_ids, attention_mask=ids.attention_mask)[0]
            else:
                out = self.model(ids.input_ids)[0]
        return out.float().numpy(), int(ids.attention_mask.sum())

    def encode(self, prompts: list, negative: str = "", cache_dir=None) -> tuple[np.ndarray, np.ndarray]:
        """-> (cond (B, L, D), null (1, L, D)); texts found in cache_dir are not encoded again, new ones
        are added to it."""
        from safetensors.numpy import save_file

        from vdit_deploy.files import atomic_path

        if cache_dir is not None:
            cache_dir = Path(cache_dir)
            have, mine = cache_info(cache_dir), {"rule": self.info["rule"], "digest": self.info["digest"]}
            if have is not None and have != mine:
                raise VditError(f"{cache_dir} caches another text encoder's prompts; use another --cache")
            cache_dir.mkdir(parents=True, exist_ok=True)
            if have is None:
                with atomic_path(cache_dir / CACHE_INFO) as tmp:
                    tmp.write_text(json.dumps(mine, sort_keys=True))
        entries = []
        for text in [*prompts, negative]:
            text = clean(text, self.rule.clean)
            entry = cached(cache_dir, self.info, text) if cache_dir is not None else None
            if entry is None:
                entry = self.embed(text)
                if cache_dir is not None:
                    with atomic_path(cache_dir / f"{entry_key(self.info, text)}.safetensors") as tmp:
                        save_file({"embeds": entry[0], "tokens": np.array([entry[1]], np.int64)}, str(tmp))
            entries.append(entry)
        return combine(self.rule, entries[:-1], entries[-1])


def save_conditioning(out, cond: np.ndarray, null_out=None, null: np.ndarray | None = None,
                      name: str = COND_NAME) -> None:
    """cond.safetensors (one row per prompt, `vdit sample --cond`) and the null's (`--null`, batch 1)."""
    from safetensors.numpy import save_file

    from vdit_deploy.files import atomic_path

    for path, value in ((out, cond), (null_out, null)):
        if path is not None:
            with atomic_path(path) as tmp:
                save_file({name: value}, str(tmp))
