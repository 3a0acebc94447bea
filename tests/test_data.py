import numpy as np

from vdit_deploy.data import CLASS_COLORS, MovingShapes


def centre_of_mass(frame: np.ndarray) -> np.ndarray:
    w = (frame + 1).sum(0)                                   # (H, W) brightness
    ys, xs = np.indices(w.shape)
    return np.array([(ys * w).sum(), (xs * w).sum()]) / w.sum()


def test_deterministic_from_seed_and_index():
    a, b, c = MovingShapes(seed=3), MovingShapes(seed=3), MovingShapes(seed=4)
    np.testing.assert_array_equal(a[17][0], b[17][0])
    assert a[17][1] == b[17][1]
    assert not np.array_equal(a[17][0], c[17][0])


def test_videos_are_labelled_moving_shapes():
    ds = MovingShapes(frames=8, height=16, width=16)
    videos, labels = ds.batch(range(64))
    assert videos.shape == (64, 3, 8, 16, 16) and videos.dtype == np.float32
    assert videos.min() >= -1 and videos.max() <= 1
    assert set(labels.tolist()) == {0, 1, 2, 3}
    for video, label in zip(videos, labels):
        lit = (video + 1).max(axis=0) > 0.5                  # (F, H, W) shape pixels
        assert lit.sum(axis=(1, 2)).min() >= 6               # a shape in every frame
        colour = (video[:, lit] + 1).mean(axis=1) / 2
        assert np.argmax(colour) == np.argmax(CLASS_COLORS[label])
        path = np.array([centre_of_mass(video[:, f]) for f in range(8)])
        assert np.linalg.norm(path[-1] - path[0]) + np.abs(np.diff(path, axis=0)).sum() > 2   # it moves


def test_shapes_bounce_inside_the_frame():
    ds = MovingShapes(frames=64, height=16, width=16)
    for i in range(8):
        video, _ = ds[i]
        path = np.array([centre_of_mass(video[:, f]) for f in range(64)])
        assert path.min() > 1.5 and path.max() < 14.5
