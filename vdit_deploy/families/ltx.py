"""LTX-Video (LTXVideoTransformer3DModel): rectified flow (FlowMatchEuler), fed packed tokens (B, S, C*pt*p*p)
with num_frames/height/width of the token grid and the RoPE interpolation scale as arguments (RoPE on
fractional coordinates, computed inside the model from them); T5 text with an attention mask."""
from vdit_deploy.families import Family, text_cond
from vdit_deploy.families.base import Adapter

VAE_SPATIAL, VAE_TEMPORAL, FRAME_RATE = 32, 8, 25    # LTXPipeline's VAE compression and default frame rate


class LTXVideo(Family):
    name, cls = "ltx", "LTXVideoTransformer3DModel"
    objective = "flow"
    layout = "packed tokens (B, S, C): S = F/pt * H/p * W/p"
    default_sampler = "flow-match euler, 50 steps (dynamic shift by token count)"
    dynamic_batch = False
    batch_note = "its RoPE coordinates are built with shape arithmetic on the batch"
    pipeline_latent = (21, 16, 22)        # LTXPipeline's default 161 x 512 x 704 through its VAE (8x, 32x)
    max_tokens = 128                      # LTXPipeline's max_sequence_length
    pipeline_sigmas = "linear"            # LTXPipeline: np.linspace(1, 1 / n, n), then the dynamic shift

    def cond(self, config):
        return text_cond(int(config["caption_channels"]), "T5-XXL embeddings", mask=True)

    def args(self, config, latent):
        _, frames, height, width = latent
        p, pt = int(config["patch_size"]), int(config["patch_size_t"])
        return {"num_frames": frames // pt, "height": height // p, "width": width // p, "patch_size": p,
                "patch_size_t": pt, "rope_interpolation_scale": [VAE_TEMPORAL / FRAME_RATE, VAE_SPATIAL, VAE_SPATIAL]}

    def adapter(self, net, contract):
        return LTXAdapter(net, contract)


class LTXAdapter(Adapter):
    """LTXPipeline._pack_latents / _unpack_latents around the model (importing the pipeline needs transformers)."""

    def feed(self, x_t, t, cond):
        a = self.args
        b, c, _, _, _ = x_t.shape
        f, h, w, p, pt = a["num_frames"], a["height"], a["width"], a["patch_size"], a["patch_size_t"]
        tokens = x_t.reshape(b, c, f, pt, h, p, w, p).permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)
        return {"hidden_states": tokens, "timestep": t, "num_frames": f, "height": h, "width": w,   # (B, S, C pt p p)
                "rope_interpolation_scale": tuple(a["rope_interpolation_scale"]), **cond}

    def unfeed(self, out):
        a = self.args
        f, h, w, p, pt = a["num_frames"], a["height"], a["width"], a["patch_size"], a["patch_size_t"]
        out = out.reshape(out.shape[0], f, h, w, -1, pt, p, p)
        return out.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)      # (B, C, F, H, W)


FAMILY = LTXVideo()
