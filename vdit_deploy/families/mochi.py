"""Mochi (MochiTransformer3DModel): flow matching (FlowMatchEuler, inverted sigmas), (B, C, F, H, W), T5 text
with an attention mask; learned-frequency RoPE inside the model."""
from vdit_deploy.contract import BATCH, CondInput
from vdit_deploy.families import Family
from vdit_deploy.families.base import Adapter


class Mochi(Family):
    name, cls = "mochi", "MochiTransformer3DModel"
    objective = "flow"
    default_sampler = "flow-match euler (inverted sigmas), 64 steps"
    dynamic_batch = False
    batch_note = "its attention loops over the batch, keeping each prompt's tokens with nonzero"
    pipeline_latent = (4, 60, 106)        # MochiPipeline's default 19 x 480 x 848 through its VAE (6x, 8x)
    max_tokens = 256                      # MochiPipeline's max_sequence_length

    def cond(self, config):
        return (CondInput("encoder_hidden_states", "float32", (BATCH, "seq", int(config["text_embed_dim"])),
                          doc="T5-XXL embeddings"),
                CondInput("encoder_attention_mask", "float32", (BATCH, "seq"), role="mask",
                          doc="1 = a prompt token, 0 = padding"))

    def adapter(self, net, contract):
        return Adapter(net, contract)


FAMILY = Mochi()
