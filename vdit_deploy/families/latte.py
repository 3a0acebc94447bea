"""Latte (LatteTransformer3DModel): DDPM with a learned sigma (2C output channels), (B, C, F, H, W), T5 text."""
from vdit_deploy.contract import BATCH, CondInput
from vdit_deploy.families import Family


class Latte(Family):
    name, cls = "latte", "LatteTransformer3DModel"
    default_sampler = "unipc"
    max_tokens = 120                  # LattePipeline's max_sequence_length (T5 prompts padded to it)
    int_fields = ("in_channels", "video_length", "sample_size", "caption_channels")   # checked before reading

    def latent(self, config):
        size = int(config["sample_size"])
        return int(config["in_channels"]), int(config["video_length"]), size, size

    def cond(self, config):
        return (CondInput("encoder_hidden_states", "float32", (BATCH, "seq", int(config["caption_channels"])),
                          doc="text-encoder embeddings (T5-XXL for Latte-1), padded to one length"),)



FAMILY = Latte()
