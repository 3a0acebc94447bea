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
    with pytest.raises(VditError, match="not a readable safetensors file") as e:
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
