"""HunyuanVideo (HunyuanVideoTransformer3DModel): flow matching (FlowMatchEuler), (B, C, F, H, W), two text
inputs (LLM token embeddings with their mask, CLIP's pooled embedding) and embedded guidance: a per-call
scalar the model takes (`guidance`, the scale x 1000), not classifier-free guidance, so the step graph's
null pass gets the prompt's value. Its masked_fill becomes a bool Where, which export rewrites (ORT has
no bool Where kernel)."""
from vdit_deploy.contract import BATCH, CondInput
from vdit_deploy.families import Family
from vdit_deploy.families.base import Adapter


class HunyuanVideo(Family):
    name, cls = "hunyuan", "HunyuanVideoTransformer3DModel"
    objective = "flow"
    default_sampler = "flow-match euler, 50 steps; embedded guidance 6 (no CFG: --guidance 1)"
    pipeline_latent = (33, 90, 160)       # HunyuanVideoPipeline's default 129 x 720 x 1280 (4x, 8x)
    max_tokens = 256                      # HunyuanVideoPipeline's max_sequence_length (LLM tokens)
    pipeline_sigmas = "linear_zero"       # HunyuanVideoPipeline: np.linspace(1, 0, n + 1)[:-1], then shift

    def cond(self, config):
        cond = (CondInput("encoder_hidden_states", "float32", (BATCH, "seq", int(config["text_embed_dim"])),
                          doc="the LLM's token embeddings (Llava-Llama-3)"),
                CondInput("encoder_attention_mask", "float32", (BATCH, "seq"), role="mask",
                          doc="1 = a prompt token, 0 = padding"),
                CondInput("pooled_projections", "float32", (BATCH, int(config["pooled_projection_dim"])),
                          doc="CLIP-L's pooled prompt embedding"))
        if config.get("guidance_embeds", True):
            # the graph input is not named `guidance`: that is the step graph's classifier-free scale
            cond += (CondInput("embedded_guidance", "float32", (BATCH,), role="scalar", arg="guidance",
                               doc="embedded guidance scale (6 in the pipeline), per video"),)
        return cond

    def adapter(self, net, contract):
        return HunyuanAdapter(net, contract)


class HunyuanAdapter(Adapter):
    def feed(self, x_t, t, cond):
        if "guidance" in cond:                 # HunyuanVideoPipeline: guidance_scale * 1000
            cond = {**cond, "guidance": cond["guidance"] * 1000.0}
        return {"hidden_states": x_t, "timestep": t, **cond}


FAMILY = HunyuanVideo()
