import numpy as np
import pytest

from vdit_deploy.checkpoint import SHIPPED
from vdit_deploy.data import CLASS_COLORS
from vdit_deploy.samplers import make_steps
from vdit_deploy.errors import VditError
from vdit_deploy.runtimes import open_runtime
from vdit_deploy.sampling import SampleTimes, sample


@pytest.fixture(scope="module")
def shipped():
    with open_runtime("torch", SHIPPED) as rt:
        yield rt


def test_seeded_and_deterministic(tiny_checkpoint):
    with open_runtime("torch", tiny_checkpoint) as rt:
        steps = make_steps(rt.schedule, "ddim", 5)
        a = sample(rt, rt.contract, [0, 1], steps, guidance=2.0, seed=3)
        b = sample(rt.denoise, rt.contract, [0, 1], steps, guidance=2.0, seed=3, null=rt.null)   # a bare callable too
        c = sample(rt, rt.contract, [0, 1], steps, guidance=2.0, seed=4)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 3, 8, 16, 16) and np.abs(a - c).max() > 0.1


def test_ddpm_draws_fresh_noise_each_step(tiny_checkpoint):
    with open_runtime("torch", tiny_checkpoint) as rt:
        steps = make_steps(rt.schedule, "ddpm")[-3:]          # the last 3 ancestral steps
        times = SampleTimes()
        out = sample(rt, rt.contract, [2], steps, seed=0, times=times)
    assert np.isfinite(out).all() and len(times.steps) == 3 and 0 <= times.overhead < times.total


def test_bad_labels(tiny_checkpoint):
    with open_runtime("torch", tiny_checkpoint) as rt:
        with pytest.raises(VditError, match="label 4 is out of range"):
            sample(rt, rt.contract, [1, 4], make_steps(rt.schedule, "ddim", 2))


def test_shipped_model_draws_the_class_shape_moving(shipped):
    """The demo checkpoint is trained: each class comes out in its colour, as one compact moving shape."""
    steps = make_steps(shipped.schedule, "ddim", 25)
    videos = sample(shipped, shipped.contract, [0, 1, 2, 3] * 2, steps, guidance=2.0, seed=0)
    for video, label in zip(videos, [0, 1, 2, 3] * 2):
        bright = (video + 1).max(axis=0) > 0.8                               # (F, H, W) shape pixels
        area = bright.sum(axis=(1, 2))
        assert (area > 4).all() and (area < 0.5 * 16 * 16).all(), area
        colour = ((video[:, bright] + 1) / 2).mean(axis=1)
        assert np.argmax(colour) == np.argmax(CLASS_COLORS[label]), (label, colour)
        centres = np.array([np.argwhere(frame).mean(axis=0) for frame in bright])   # (F, 2)
        path = np.linalg.norm(np.diff(centres, axis=0), axis=1).sum()
        assert path > 2.0, path           # it moves (it may bounce back, so not only first-to-last)
