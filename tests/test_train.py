import numpy as np
import pytest
from safetensors.numpy import load_file

from vdit_deploy.config import preset
from vdit_deploy.errors import VditError
from vdit_deploy.train import TRAINING_STATE, TrainConfig, train

SMALL = preset("tiny", hidden_size=32, depth=1, num_heads=2, frames=4, height=8, width=8)


def test_loss_goes_down(tmp_path):
    first = train(SMALL, tmp_path / "a", TrainConfig(steps=1, batch_size=16, checkpoint_every=1000), progress=False)
    later = train(SMALL, tmp_path / "b", TrainConfig(steps=60, batch_size=16, lr=2e-3, warmup=5,
                                                       checkpoint_every=1000), progress=False)
    assert later["final_loss"] < 0.6 * first["final_loss"]


def test_resume_is_exact(tmp_path):
    cfg = dict(batch_size=4, checkpoint_every=2)
    train(SMALL, tmp_path / "straight", TrainConfig(steps=4, **cfg), progress=False)
    train(SMALL, tmp_path / "resumed", TrainConfig(steps=2, **cfg), progress=False)
    train(SMALL, tmp_path / "resumed", TrainConfig(steps=4, **cfg), progress=False)
    for name in ("model.safetensors", TRAINING_STATE):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_refuses_another_config(tmp_path):
    train(SMALL, tmp_path / "run", TrainConfig(steps=1, batch_size=2), progress=False)
    with pytest.raises(VditError, match="another model config"):
        train(SMALL.replace(depth=2), tmp_path / "run", TrainConfig(steps=2, batch_size=2), progress=False)


def test_latent_presets_are_retargeted_to_moving_shapes_and_say_so():
    from vdit_deploy.config import preset
    from vdit_deploy.train import moving_shapes_config

    cfg, note = moving_shapes_config(preset("S"))
    assert (cfg.in_channels, cfg.num_classes) == (3, 4) and "in_channels 3 (was 4)" in note
    assert moving_shapes_config(preset("tiny")) == (preset("tiny"), None)


def test_flow_objective_learns_the_velocity_and_samples_as_a_flow_model(tmp_path):
    """--objective flow: the loss goes down, the checkpoint's contract is a flow model (output flow, a
    FlowSchedule), and --init starts a run from another checkpoint's weights."""
    from vdit_deploy.checkpoint import read_info
    from vdit_deploy.flow import FlowSchedule
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import sample, sampler_plan

    cfg = dict(batch_size=16, lr=2e-3, warmup=5, checkpoint_every=1000)
    first = train(SMALL, tmp_path / "a", TrainConfig(steps=1, **cfg), FlowSchedule(), progress=False)
    later = train(SMALL, tmp_path / "b", TrainConfig(steps=60, **cfg), FlowSchedule(), progress=False)
    assert later["final_loss"] < 0.75 * first["final_loss"]    # the velocity's variance: a higher floor than eps
    assert read_info(tmp_path / "b").schedule == FlowSchedule()
    with open_runtime("torch", tmp_path / "b") as rt:
        assert rt.contract.output == "flow"
        plan = sampler_plan(rt.contract, None, 4)            # the schedule's default: flow euler
        assert [round(s.t) for s in plan] == [1000, 667, 334, 1]     # diffusers: linspace(1000, 1, n)
        videos = sample(rt, rt.contract, [0, 1], plan, 2.0, 0)
        assert videos.shape == (2, *SMALL.video_shape) and np.isfinite(videos).all()
    started = train(SMALL, tmp_path / "c", TrainConfig(steps=1, **cfg), FlowSchedule(), progress=False,
                    init=tmp_path / "b")
    assert started["final_loss"] < first["final_loss"]
    with pytest.raises(VditError, match="another model config"):
        train(SMALL.replace(depth=2), tmp_path / "d", TrainConfig(steps=1, **cfg), FlowSchedule(), progress=False,
              init=tmp_path / "b")


def test_shipped_flow_checkpoint_samples_distinct_classes():
    """assets/tiny-flow (the tiny preset fine-tuned to flow matching on Moving Shapes): a flow model
    whose UniPC-flow samples of the 4 classes are distinct videos in the data's range."""
    from vdit_deploy.checkpoint import SHIPPED_FLOW, read_info
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import sample, sampler_plan

    assert read_info(SHIPPED_FLOW).schedule.kind == "flow"
    with open_runtime("torch", SHIPPED_FLOW) as rt:
        videos = sample(rt, rt.contract, [0, 1, 2, 3], sampler_plan(rt.contract, "unipc", 8), 2.0, 0)
    assert np.abs(videos).max() < 1.5
    for i in range(4):
        for j in range(i):
            assert np.linalg.norm(videos[i] - videos[j]) > 0.3 * np.linalg.norm(videos[j])
