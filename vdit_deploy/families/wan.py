"""Wan 2.1 / 2.2 (WanTransformer3DModel, and its fine-tunes SkyReels-V2, ChronoEdit): flow matching (UniPC
with flow sigmas), (B, C, F, H, W), umT5 text; 3D RoPE computed inside the model (real cos/sin)."""
from pathlib import Path

from vdit_deploy.contract import BATCH, CondInput
from vdit_deploy.errors import VditError
from vdit_deploy.families import Family


class Wan(Family):
    name, cls = "wan", "WanTransformer3DModel"
    objective = "flow"
    default_sampler = "unipc (flow sigmas, flow_shift 3 at 480p / 5 at 720p), 50 steps"
    pipeline_latent = (21, 60, 104)       # WanPipeline's default 81 x 480 x 832 through the VAE (4x, 8x)
    max_tokens = 512                      # WanPipeline's max_sequence_length

    def check(self, path, config):
        if config.get("image_dim") is not None:
            raise VditError(f"{path}: image-to-video Wan (image_dim {config['image_dim']}: CLIP image tokens and "
                            "image latents) is not supported yet; text-to-video Wan is")
        if (Path(path).parent / "transformer_2").is_dir():
            raise VditError(f"{Path(path).parent} holds transformer_2: Wan 2.2 A14B's two experts switch at the "
                            "pipeline's boundary_ratio, which vdit does not sample yet; export one expert's directory "
                            "from a copy without transformer_2 beside it")

    def cond(self, config):
        return (CondInput("encoder_hidden_states", "float32", (BATCH, "seq", int(config["text_dim"])),
                          doc="umT5-XXL embeddings (the pipeline zero-pads them to 512 tokens)"),)



FAMILY = Wan()
