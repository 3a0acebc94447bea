"""Tiny random diffusers pipelines saved as users have them (save_pretrained, safetensors), built offline:
a VAE per family, a T5/umT5 text encoder with a tokenizer made from a `tokenizers` WordLevel model."""
from pathlib import Path

WORDS = "a cat dog playing piano waves at sunset on the beach red blue car city night".split()


def save_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    return len(vocab)


def save_text_encoder(path: Path, width: int, umt5: bool = False, seed: int = 0):
    """text_encoder/ + tokenizer/ under path: a 1-layer T5 (or umT5) encoder of d_model `width`."""
    import torch
    import transformers

    vocab = save_tokenizer(path / "tokenizer")
    torch.manual_seed(seed)
    cls, cfg = ((transformers.UMT5EncoderModel, transformers.UMT5Config) if umt5 else
                (transformers.T5EncoderModel, transformers.T5Config))
    model = cls(cfg(vocab_size=vocab, d_model=width, d_kv=8, d_ff=2 * width, num_layers=1, num_heads=2,
                    relative_attention_num_buckets=8))
    model.save_pretrained(path / "text_encoder")


def tiny_vae(kind: str, seed: int = 0):
    import diffusers
    import torch

    torch.manual_seed(seed)
    if kind == "kl":          # Latte's: 4 latent channels, x2 spatial
        vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                      latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.18215)
    elif kind == "wan":       # causal 3D, x4 spatial, x2 temporal, latents_mean/std
        vae = diffusers.AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                                         temperal_downsample=[False, True], attn_scales=[],
                                         latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.0, 2.0, 0.5, 1.5],
                                         scale_factor_spatial=4, scale_factor_temporal=2)
    elif kind == "wan22":     # Wan 2.2's: residual up blocks (first-chunk shortcut), patched output (x2 x4)
        vae = diffusers.AutoencoderKLWan(base_dim=4, decoder_base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                                         temperal_downsample=[False, True], attn_scales=[], is_residual=True,
                                         in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=8,
                                         scale_factor_temporal=2, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    elif kind == "ltx":       # LTX-Video's, non-causal decoder: x4 spatial, x4 temporal
        vae = diffusers.AutoencoderKLLTXVideo(
            latent_channels=4, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
            timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False)
        with torch.no_grad():   # latents_mean / latents_std are buffers: make them count
            vae.latents_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
            vae.latents_std.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
    else:                     # CogVideoX: causal 3D with conv_cache, x4 spatial, x2 temporal
        vae = diffusers.AutoencoderKLCogVideoX(
            block_out_channels=(8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
            temporal_compression_ratio=2, down_block_types=("CogVideoXDownBlock3D",) * 3,
            up_block_types=("CogVideoXUpBlock3D",) * 3, sample_height=64, sample_width=64)
    with torch.no_grad():     # away from the initialisation's symmetries
        for p in vae.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return vae.eval()


def save_latte_pipeline(path: Path):
    """PIPE/{transformer, vae, scheduler, text_encoder, tokenizer, model_index.json}: LattePipeline's layout."""
    import json

    import diffusers

    from conftest import save_tiny_latte

    path = Path(path)
    save_tiny_latte(path / "transformer")
    (path / "transformer" / "scheduler_config.json").rename(path / "scheduler_config.json")
    (path / "scheduler").mkdir()
    (path / "scheduler_config.json").rename(path / "scheduler" / "scheduler_config.json")
    tiny_vae("kl").save_pretrained(path / "vae")
    save_text_encoder(path, 32)
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "LattePipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "transformer": ["diffusers", "LatteTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    return path


def _save_index(path: Path, cls: str, encoder: str, transformer: str, vae: str, scheduler: str):
    import json

    import diffusers

    (path / "model_index.json").write_text(json.dumps({
        "_class_name": cls, "_diffusers_version": diffusers.__version__, "scheduler": ["diffusers", scheduler],
        "text_encoder": ["transformers", encoder], "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", transformer], "vae": ["diffusers", vae]}))


def _perturbed(model, seed: int):
    """Weights moved off their zero initialisation (output layers) so the output depends on every input."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


COG_LATENT = (4, 3, 6, 8)       # (C, F, H, W): 5 frames through a x2 temporal VAE, 24 x 32 pixels


def save_cogvideox_pipeline(path: Path):
    """CogVideoXPipeline's layout: a 1-layer 5B-style (RoPE) transformer taking the tiny T5's 16-wide
    embeddings padded to the pipeline's 226 tokens, CogVideoXDDIMScheduler, the tiny CogVideoX VAE."""
    import diffusers

    path = Path(path)
    c, f, h, w = COG_LATENT
    net = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=c, out_channels=c, time_embed_dim=8,
        text_embed_dim=16, num_layers=1, sample_width=w, sample_height=h, sample_frames=(f - 1) * 2 + 1,
        temporal_compression_ratio=2, patch_size=2, max_text_seq_length=226, use_rotary_positional_embeddings=True)
    _perturbed(net, 1).save_pretrained(path / "transformer")
    diffusers.CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     prediction_type="v_prediction", timestep_spacing="trailing",
                                     rescale_betas_zero_snr=True, snr_shift_scale=1.0,
                                     ).save_pretrained(path / "scheduler")
    tiny_vae("cogvideox").save_pretrained(path / "vae")
    save_text_encoder(path, 16)
    _save_index(path, "CogVideoXPipeline", "T5EncoderModel", "CogVideoXTransformer3DModel", "AutoencoderKLCogVideoX",
                "CogVideoXDDIMScheduler")
    return path


WAN_LATENT = (4, 2, 8, 8)       # 3 frames through the x2 temporal causal VAE, 32 x 32 pixels


def save_wan_pipeline(path: Path):
    """WanPipeline's layout: a 1-layer transformer on the tiny umT5's 16-wide embeddings (512 tokens, zeros
    past the prompt), UniPC with flow sigmas, the tiny Wan VAE (latents_mean / latents_std)."""
    import diffusers

    path = Path(path)
    net = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                          in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                          num_layers=1, rope_max_seq_len=32)
    _perturbed(net, 2).save_pretrained(path / "transformer")
    diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                      ).save_pretrained(path / "scheduler")
    tiny_vae("wan").save_pretrained(path / "vae")
    save_text_encoder(path, 16, umt5=True)
    _save_index(path, "WanPipeline", "UMT5EncoderModel", "WanTransformer3DModel", "AutoencoderKLWan",
                "UniPCMultistepScheduler")
    return path
