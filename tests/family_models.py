"""Tiny random models of the flow-matching video DiT families (Wan, LTX-Video, Mochi, HunyuanVideo), saved
in the pipeline layout with their pipeline's real scheduler config, and each family's own diffusers
pipeline run on given latents and prompt embeddings: the reference vdit's samples are held to."""
import numpy as np

SEQ, TEXT = 8, 16
FLOW_FAMILIES = ("wan", "ltx", "mochi", "hunyuan")


def save_pipeline(root, model, scheduler, seed: int = 0):
    """transformer/ and scheduler/ as a pipeline's save_pretrained writes them; weights moved off their
    zero initialisation (the output layers) so the output depends on every input."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / "transformer")
    scheduler.save_pretrained(root / "scheduler")
    return root / "transformer"


COG_TEXT, COG_SEQ = 16, 12


def tiny_cogvideox(rotary: bool):
    import diffusers

    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=COG_TEXT, num_layers=1, sample_width=8, sample_height=6, sample_frames=9, patch_size=2,
        max_text_seq_length=COG_SEQ, use_rotary_positional_embeddings=rotary)


def cogvideox_scheduler():
    """CogVideoX's schedule (scaled_linear 0.00085..0.012, v_prediction, trailing) in UniPC."""
    import diffusers

    return diffusers.UniPCMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             prediction_type="v_prediction", timestep_spacing="trailing")


def tiny_family(name):
    """(model, its pipeline's scheduler, latent (C, F, H, W), for a flow family the pipeline's call as a
    function of (net, x_t (B, C, F, H, W), t, cond dict) -> out (B, C, F, H, W), else None)."""
    import diffusers as d

    if name == "cogvideox":   # the 2B's sincos positions
        return tiny_cogvideox(False), cogvideox_scheduler(), (4, 3, 6, 8), None
    if name == "wan":
        model = d.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=4, out_channels=4, text_dim=TEXT, freq_dim=16, ffn_dim=32,
                                        num_layers=1, rope_max_seq_len=32)
        scheduler = d.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
        call = lambda net, x, t, c: net(hidden_states=x, timestep=t, encoder_hidden_states=c["encoder_hidden_states"],
                                        return_dict=False)[0]
        return model, scheduler, (4, 2, 8, 8), call
    if name == "ltx":
        model = d.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                             cross_attention_dim=16, num_layers=1, caption_channels=TEXT)
        scheduler = d.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                      base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)

        def call(net, x, t, c):   # LTXPipeline's packing, arguments and rope scale (8 / 25 fps, 32, 32)
            b, _, f, h, w = x.shape
            tokens = d.LTXPipeline._pack_latents(x, 1, 1)
            out = net(hidden_states=tokens, encoder_hidden_states=c["encoder_hidden_states"], timestep=t,
                      encoder_attention_mask=c["encoder_attention_mask"], num_frames=f, height=h, width=w,
                      rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)[0]
            return d.LTXPipeline._unpack_latents(out, f, h, w, 1, 1)
        return model, scheduler, (8, 2, 4, 4), call
    if name == "mochi":
        model = d.MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                          pooled_projection_dim=16, in_channels=4, text_embed_dim=TEXT,
                                          time_embed_dim=16, max_sequence_length=SEQ)
        scheduler = d.FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
        call = lambda net, x, t, c: net(hidden_states=x, encoder_hidden_states=c["encoder_hidden_states"], timestep=t,
                                        encoder_attention_mask=c["encoder_attention_mask"], return_dict=False)[0]
        return model, scheduler, (4, 2, 8, 8), call
    model = d.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
                                             num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                             text_embed_dim=TEXT, pooled_projection_dim=8, rope_axes_dim=(4, 4, 4))
    scheduler = d.FlowMatchEulerDiscreteScheduler(shift=7.0)
    call = lambda net, x, t, c: net(hidden_states=x, timestep=t, encoder_hidden_states=c["encoder_hidden_states"],
                                    encoder_attention_mask=c["encoder_attention_mask"],
                                    pooled_projections=c["pooled_projections"],
                                    guidance=c["embedded_guidance"] * 1000.0, return_dict=False)[0]  # the pipeline's
    return model, scheduler, (4, 2, 8, 8), call


def pipeline_sample(name, model_dir, x_T, cond, null, steps: int, guidance: float) -> np.ndarray:
    """The family's own diffusers pipeline (its __call__: its scheduler loaded from scheduler/, its
    sigmas and shift, its classifier-free guidance) driving the PyTorch model from x_T (B, C, F, H, W),
    with `cond` the prompt's and `null` (batch 1) the negative prompt's embeddings; no text encoder, no
    VAE (output_type="latent"). Returns (B, C, F, H, W)."""
    import json

    import diffusers as d
    import torch

    config = json.loads((model_dir.parent / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(d, config["_class_name"]).from_pretrained(model_dir.parent / "scheduler")
    net = getattr(d, json.loads((model_dir / "config.json").read_text())["_class_name"]).from_pretrained(model_dir)
    net.eval()
    b, _, f, h, w = x_T.shape
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    neg = {k: t(np.repeat(v, b, axis=0)) for k, v in null.items()}
    pos = {k: t(v) for k, v in cond.items()}
    latents = t(x_T)
    common = dict(num_inference_steps=steps, output_type="latent", return_dict=False)
    with torch.no_grad():
        if name == "wan":
            pipe = d.WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=net, scheduler=scheduler)
            out = pipe(prompt_embeds=pos["encoder_hidden_states"], negative_prompt_embeds=neg["encoder_hidden_states"],
                       latents=latents, guidance_scale=guidance, height=h * 8, width=w * 8, num_frames=(f - 1) * 4 + 1,
                       **common)[0]
        elif name == "ltx":
            pipe = d.LTXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=net, scheduler=scheduler)
            out = pipe(prompt_embeds=pos["encoder_hidden_states"], prompt_attention_mask=pos["encoder_attention_mask"],
                       negative_prompt_embeds=neg["encoder_hidden_states"],
                       negative_prompt_attention_mask=neg["encoder_attention_mask"],
                       latents=d.LTXPipeline._pack_latents(latents, 1, 1), guidance_scale=guidance, height=h * 32,
                       width=w * 32, num_frames=(f - 1) * 8 + 1, **common)[0]
            out = d.LTXPipeline._unpack_latents(out, f, h, w, 1, 1)
        elif name == "mochi":
            pipe = d.MochiPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=net, scheduler=scheduler)
            out = pipe(prompt_embeds=pos["encoder_hidden_states"], prompt_attention_mask=pos["encoder_attention_mask"],
                       negative_prompt_embeds=neg["encoder_hidden_states"],
                       negative_prompt_attention_mask=neg["encoder_attention_mask"], latents=latents,
                       guidance_scale=guidance, height=h * 8, width=w * 8, num_frames=(f - 1) * 6 + 1, **common)[0]
        else:   # embedded guidance (the cond's scale, x 1000 in the pipeline); true CFG off (true_cfg_scale 1)
            pipe = d.HunyuanVideoPipeline(tokenizer=None, text_encoder=None, tokenizer_2=None, text_encoder_2=None,
                                          vae=None, transformer=net, scheduler=scheduler)
            scale = float(cond["embedded_guidance"][0])
            assert np.all(cond["embedded_guidance"] == scale) and guidance == 1.0
            out = pipe(prompt_embeds=pos["encoder_hidden_states"], prompt_attention_mask=pos["encoder_attention_mask"],
                       pooled_prompt_embeds=pos["pooled_projections"], latents=latents, guidance_scale=scale,
                       height=h * 8, width=w * 8, num_frames=(f - 1) * 4 + 1, **common)[0]
    return out.float().numpy()
