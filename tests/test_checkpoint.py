import json
import shutil

import pytest
import torch

from vdit_deploy.checkpoint import CONFIG, SHIPPED, WEIGHTS, load_model, read_info
from vdit_deploy.errors import VditError


def test_roundtrip(tiny_checkpoint):
    model, info = load_model(tiny_checkpoint)
    assert info.model.hidden_size == 128 and info.schedule.num_timesteps == 1000
    x = torch.randn(1, *info.model.video_shape)
    assert model(x, torch.tensor([5.0]), torch.tensor([1])).abs().sum() > 0


def test_shipped_checkpoint_is_trained_ema():
    info = read_info(SHIPPED)
    assert info.ema and info.step >= 1000
    assert (SHIPPED / WEIGHTS).stat().st_size < 10e6          # a few MB


def test_truncated_weights_give_one_line_error(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    data = (broken / WEIGHTS).read_bytes()
    (broken / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(VditError, match="not a readable safetensors file|a forged or corrupt header") as e:
        load_model(broken)
    assert "\n" not in str(e.value)


def test_mismatched_config_is_refused(tiny_checkpoint, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    meta = json.loads((other / CONFIG).read_text())
    meta["model"]["hidden_size"] = 64
    (other / CONFIG).write_text(json.dumps(meta))
    with pytest.raises(VditError, match="has shape .* config expects"):
        load_model(other)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(VditError, match="is not a directory"):
        read_info(tmp_path / "nope")
    (tmp_path / CONFIG).write_text("{}")
    (tmp_path / WEIGHTS).write_bytes(b"")
    with pytest.raises(VditError, match="not a vdit checkpoint config"):
        read_info(tmp_path)


def test_a_checkpoint_is_one_instance_of_the_contract(tiny_checkpoint):
    """The built-in VideoDiT: conditioning y int32 (batch,) with num_classes labels, null label
    num_classes, eps output, the checkpoint's latent shape and schedule; the module takes (x_t, t, y)."""
    import numpy as np

    from vdit_deploy.contract import BUILTIN, Contract
    from vdit_deploy.sources import load_source

    source = load_source(tiny_checkpoint)
    _, info = load_model(tiny_checkpoint)
    c = source.contract
    assert c.names == ("y",) and c.cond[0].dtype == "int32" and c.cond[0].shape == ("batch",)
    assert c.label_input().classes == info.model.num_classes and c.output == "eps" and c.out_channels == 3
    assert c.latent == tuple(info.model.video_shape) and c.schedule == info.schedule and c.axes == {}
    assert source.null["y"].tolist() == [info.model.null_label] and source.model["class"] == BUILTIN
    assert Contract.from_dict(json.loads(json.dumps(c.to_dict()))) == c          # stored form round-trips
    cond = c.labels([0, info.model.num_classes - 1])
    out = source.module(torch.randn(2, *c.latent), torch.tensor([3.0, 700.0]), torch.from_numpy(cond["y"]))
    assert tuple(out.shape) == (2, c.out_channels, *c.latent[1:])
    with pytest.raises(VditError, match="out of range"):
        c.labels([info.model.num_classes])                          # the null label is not a class
    assert np.array_equal(c.null_batch(source.null, cond)["y"], [info.model.null_label] * 2)
