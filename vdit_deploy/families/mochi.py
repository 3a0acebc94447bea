"""Mochi (MochiTransformer3DModel): flow matching (FlowMatchEuler, inverted sigmas), (B, C, F, H, W), T5 text
with an attention mask; learned-frequency RoPE inside the model."""
from vdit_deploy.families import Family, text_cond


class Mochi(Family):
    name, cls = "mochi", "MochiTransformer3DModel"
    objective = "flow"
    default_sampler = "flow-match euler (inverted sigmas), 64 steps"
    dynamic_batch = False
    batch_note = "its attention loops over the batch, keeping each prompt's tokens with nonzero"
    pipeline_latent = (4, 60, 106)        # MochiPipeline's default 19 x 480 x 848 through its VAE (6x, 8x)
    max_tokens = 256                      # MochiPipeline's max_sequence_length

    def cond(self, config):
        return text_cond(int(config["text_embed_dim"]), "T5-XXL embeddings", mask=True)



FAMILY = Mochi()
