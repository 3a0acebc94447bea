"""A user's own video denoiser, as a diffusers ModelMixin (importable as own_models:MaskedTextDiT when
tests/ is on the path): patch tokens cross-attend to the text tokens an attention mask keeps; it
predicts x0. The tests export it by class name (`vdit export --class`) and through the Python API."""
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config


class MaskedTextDiT(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels: int = 3, width: int = 16, text_width: int = 8, heads: int = 2):
        super().__init__()
        self.proj_in, self.proj_out = nn.Linear(in_channels, width), nn.Linear(width, in_channels)
        self.text, self.time = nn.Linear(text_width, width), nn.Linear(1, width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, hidden_states, timestep, context, mask, return_dict: bool = True):
        """(B,C,F,H,W), (B,), (B,L,text_width), (B,L) 1 = keep -> (B,C,F,H,W)"""
        b, c, f, h, w = hidden_states.shape
        tokens = self.proj_in(hidden_states.flatten(2).transpose(1, 2)) + self.time(timestep[:, None, None] / 1000)
        keys = self.text(context)                                                # (B, L, width)
        bias = (1 - mask)[:, None, :] * -1e4                                    # (B, 1, L): masked keys off
        bias = bias.repeat_interleave(self.config.heads, 0).expand(-1, tokens.shape[1], -1)
        mixed, _ = self.attn(tokens, keys, keys, attn_mask=bias, need_weights=False)
        out = self.proj_out(tokens + mixed).transpose(1, 2).reshape(b, c, f, h, w)
        return (out,)
