"""CogVideoX (CogVideoXTransformer3DModel): v-prediction DDPM (zero terminal SNR, CogVideoXDDIM/DPM), fed
(B, F, C, H, W); 2B has sincos positions inside the model (recomputed per call at a size other than its
sample size: baked for the export's), 5B (and 1.5) a 3D RoPE table the pipeline builds: here built once
from the latent shape with the pipeline's own code, baked into the graph."""
import torch

from vdit_deploy.contract import BATCH, CondInput
from vdit_deploy.errors import VditError
from vdit_deploy.families import Family
from vdit_deploy.families.base import Adapter


class CogVideoX(Family):
    name, cls = "cogvideox", "CogVideoXTransformer3DModel"
    layout = "(B, F, C, H, W)"
    default_sampler = "ddim (CogVideoXDDIMScheduler: trailing, 50 steps)"

    def check(self, path, config):
        out = config.get("out_channels") or config["in_channels"]
        if out != config["in_channels"]:
            raise VditError(f"{path}: image-to-video CogVideoX (in_channels {config['in_channels']}: the latents and "
                            f"the image's, {out} out) is not supported yet; text-to-video CogVideoX is")
        if config.get("ofs_embed_dim"):
            raise VditError(f"{path}: CogVideoX 1.5 image-to-video (ofs_embed_dim) is not supported yet")

    def latent(self, config):
        frames = (int(config["sample_frames"]) - 1) // int(config["temporal_compression_ratio"]) + 1
        p_t = config.get("patch_size_t") or 1
        frames = -(-frames // p_t) * p_t                 # 1.5: padded to the temporal patch (as the pipeline does)
        return int(config["in_channels"]), frames, int(config["sample_height"]), int(config["sample_width"])

    def cond(self, config):
        # the pipeline pads every prompt to max_text_seq_length (226), and the 2B's positional table spans
        # exactly that many text tokens: a fixed length
        seq = int(config["max_text_seq_length"])
        return (CondInput("encoder_hidden_states", "float32", (BATCH, seq, int(config["text_embed_dim"])),
                          doc=f"T5-XXL embeddings, padded to {seq} tokens"),)

    def args(self, config, latent):
        return {"rotary": bool(config.get("use_rotary_positional_embeddings"))}

    def adapter(self, net, contract):
        return CogVideoXAdapter(net, contract)


def rotary_table(config, latent) -> tuple[torch.Tensor, torch.Tensor]:
    """CogVideoXPipeline._prepare_rotary_positional_embeddings for this latent shape: (cos, sin), each
    (tokens, attention_head_dim)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    _, frames, height, width = latent
    p, p_t = config["patch_size"], config.get("patch_size_t")
    grid = (height // p, width // p)
    base_h, base_w = config["sample_height"] // p, config["sample_width"] // p
    if p_t is None:   # CogVideoX 1.0
        return get_3d_rotary_pos_embed(embed_dim=config["attention_head_dim"], grid_size=grid, temporal_size=frames,
                                       crops_coords=get_resize_crop_region_for_grid(grid, base_w, base_h))
    return get_3d_rotary_pos_embed(embed_dim=config["attention_head_dim"], crops_coords=None, grid_size=grid,
                                   temporal_size=(frames + p_t - 1) // p_t, grid_type="slice",
                                   max_size=(base_h, base_w))


def get_resize_crop_region_for_grid(src, tgt_width, tgt_height):
    """diffusers.pipelines.cogvideo.pipeline_cogvideox's, as it is (importing that module needs transformers)."""
    tw, th = tgt_width, tgt_height
    h, w = src
    r = h / w
    if r > (th / tw):
        resize_height = th
        resize_width = int(round(th / h * w))
    else:
        resize_width = tw
        resize_height = int(round(tw / w * h))
    crop_top = int(round((th - resize_height) / 2.0))
    crop_left = int(round((tw - resize_width) / 2.0))
    return (crop_top, crop_left), (crop_top + resize_height, crop_left + resize_width)


def bake_sincos_table(embed, latent) -> None:
    """CogVideoX-2B's patch embedding recomputes its sincos table in every forward whose latent differs
    from the config's sample size, writing into a fresh tensor (torch.export refuses: "lifted_tensor is
    mutated"). For the export's latent shape that table is one constant: computed once here with the
    model's own code and kept as the buffer its forward reads at the sample size."""
    _, frames, height, width = latent
    before = (frames - 1) * embed.temporal_compression_ratio + 1        # pre-VAE frames, as forward counts them
    if (embed.sample_height, embed.sample_width, embed.sample_frames) == (height, width, before):
        return
    table = embed._get_positional_embeddings(height, width, before)     # (1, text + video tokens, width)
    embed.sample_height, embed.sample_width, embed.sample_frames = height, width, before
    embed.register_buffer("pos_embedding", table, persistent=False)


class CogVideoXAdapter(Adapter):
    def __init__(self, net, contract):
        super().__init__(net, contract)
        self.rotary = self.args["rotary"]
        if getattr(net.patch_embed, "use_positional_embeddings", False):
            bake_sincos_table(net.patch_embed, self.latent)
        if self.rotary:   # constants of the graph: the latent shape is fixed
            cos, sin = rotary_table(net.config, self.latent)
            self.register_buffer("rotary_cos", cos.float(), persistent=False)
            self.register_buffer("rotary_sin", sin.float(), persistent=False)

    def feed(self, x_t, t, cond):
        kwargs = {"hidden_states": x_t.transpose(1, 2), "timestep": t, **cond}     # (B, F, C, H, W)
        if self.rotary:
            kwargs["image_rotary_emb"] = (self.rotary_cos, self.rotary_sin)
        return kwargs

    def unfeed(self, out):
        return out.transpose(1, 2)                                                   # (B, C, F, H, W)


FAMILY = CogVideoX()
