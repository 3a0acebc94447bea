import pytest
import torch
import torch.nn.functional as F

from vdit_deploy.config import ATTENTION_MODES, PRESETS, ModelConfig, preset
from vdit_deploy.errors import VditError
from vdit_deploy.model import Attention, VideoDiT, spatial_attention, temporal_attention


def randomize(model: VideoDiT, seed: int = 0) -> VideoDiT:
    """adaLN-Zero starts every block as the identity; perturb all weights so the test sees real attention."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("mode", ATTENTION_MODES)
@pytest.mark.parametrize("sizes", [dict(), dict(frames=6, height=10, width=14, tubelet=(3, 2, 2)),
                                   dict(frames=3, height=4, width=8, tubelet=(1, 4, 4), in_channels=1)])
def test_output_shape_all_modes(mode, sizes):
    cfg = preset("tiny", attention=mode, hidden_size=32, depth=2, num_heads=4, **sizes)
    model = randomize(VideoDiT(cfg))
    x = torch.randn(3, *cfg.video_shape)
    out = model(x, torch.tensor([0.0, 500.0, 999.0]), torch.tensor([0, 3, cfg.null_label]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all() and out.abs().sum() > 0


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_adaln_zero_init_outputs_exactly_zero(mode):
    cfg = preset("tiny", attention=mode)
    out = VideoDiT(cfg)(torch.randn(2, *cfg.video_shape), torch.tensor([3.0, 700.0]), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0


def test_parameter_count_matches_config():
    for mode in ATTENTION_MODES:
        cfg = preset("tiny", attention=mode)
        assert sum(p.numel() for p in VideoDiT(cfg).parameters()) == cfg.num_params()


def frame_mask(f: int, s: int) -> torch.Tensor:
    frame = torch.arange(f).repeat_interleave(s)             # token (f, s) at index f*S + s
    return frame[:, None] == frame[None, :]


def test_factorized_attention_equals_masked_joint_attention():
    """Spatial attention = joint attention where tokens see only their own frame; temporal attention =
    joint attention where tokens see only their own spatial position (a block-diagonal mask)."""
    torch.manual_seed(0)
    b, f, s, d = 2, 4, 9, 32
    attn = Attention(d, num_heads=4)
    x = torch.randn(b, f, s, d)
    joint_in = x.reshape(b, f * s, d)
    same_frame = frame_mask(f, s)
    pos = torch.arange(s).repeat(f)
    same_position = pos[:, None] == pos[None, :]
    spatial = spatial_attention(attn, x).reshape(b, f * s, d)
    temporal = temporal_attention(attn, x).reshape(b, f * s, d)
    torch.testing.assert_close(spatial, attn(joint_in, mask=same_frame), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(temporal, attn(joint_in, mask=same_position), atol=1e-5, rtol=1e-5)
    # and the mask matters: unmasked joint attention is different
    assert (attn(joint_in) - spatial).abs().max() > 1e-3


def test_split_head_attention_matches_masked_heads():
    """factorized_dot_product: the first half of the heads equals masked spatial attention, the second
    half masked temporal attention, computed from the same projections."""
    torch.manual_seed(1)
    cfg = preset("tiny", attention="factorized_dot_product", hidden_size=32, num_heads=4, depth=1)
    block = randomize(VideoDiT(cfg)).blocks[0].attn
    b, (f, h, w), d = 2, cfg.grid, cfg.hidden_size
    s = h * w
    x = torch.randn(b, f, s, d)
    q, k, v = block.qkv(x.reshape(b, f * s, d)).reshape(b, f * s, 3, 4, d // 4).permute(2, 0, 3, 1, 4)
    pos = torch.arange(s).repeat(f)
    masks = [frame_mask(f, s)] * 2 + [pos[:, None] == pos[None, :]] * 2          # per head
    heads = [F.scaled_dot_product_attention(q[:, i], k[:, i], v[:, i], attn_mask=masks[i]) for i in range(4)]
    expected = block.proj(torch.stack(heads, 2).reshape(b, f * s, d)).reshape(b, f, s, d)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sizes,message", [
    (dict(frames=7), "frames=7 is not divisible by the tubelet size 2"),
    (dict(height=15), "height=15 is not divisible"),
    (dict(tubelet=(1, 2, 3)), "tubelet must be square"),
    (dict(attention="axial"), "attention must be one of"),
])
def test_invalid_sizes_give_clear_errors(sizes, message):
    with pytest.raises(VditError, match=message):
        preset("tiny", **sizes)


def test_flops_follow_attention_cost():
    s = PRESETS["S"]
    assert abs(s.flops() / 1e9 - 126) < 1              # the S-sized video DiT of the brief
    assert s.replace(attention="joint").flops() > s.flops()
    assert s.flops(batch=4) == 4 * s.flops()


def test_config_roundtrip():
    cfg = preset("tiny", attention="joint")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(VditError, match="model config has unknown field.s. colour"):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": 1})
