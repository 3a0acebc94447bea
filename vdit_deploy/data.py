"""Moving Shapes: a procedurally generated, class-labelled video dataset (no download).

Each video shows one shape whose kind and colour are set by the class, moving in a straight line
and bouncing off the frame edges. Item i of a dataset with seed s is the same on every machine.
"""
from __future__ import annotations

import numpy as np

from vdit_deploy.errors import VditError

CLASS_NAMES = ("square", "disc", "triangle", "cross")
CLASS_COLORS = np.array([[1.0, 0.25, 0.2], [0.2, 0.9, 0.3], [0.25, 0.45, 1.0], [1.0, 0.85, 0.1]])


def shape_mask(kind: int, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Soft (anti-aliased) coverage in [0, 1] of a shape of radius r, at offsets (dy, dx) from its centre."""
    if kind == 0:
        dist = np.maximum(np.abs(dx), np.abs(dy)) - 0.8 * r
    elif kind == 1:
        dist = np.hypot(dx, dy) - r
    elif kind == 2:   # upward triangle: inside three half-planes
        dist = np.maximum(dy - 0.6 * r, np.maximum(-0.87 * dx - 0.5 * dy, 0.87 * dx - 0.5 * dy) - 0.5 * r)
    elif kind == 3:   # plus sign: union of two bars
        bar_h = np.maximum(np.abs(dx) - r, np.abs(dy) - 0.35 * r)
        bar_v = np.maximum(np.abs(dy) - r, np.abs(dx) - 0.35 * r)
        dist = np.minimum(bar_h, bar_v)
    else:
        raise VditError(f"no shape for class {kind}")
    return np.clip(0.5 - dist, 0.0, 1.0)


def bounce(start: float, velocity: float, lo: float, hi: float, frames: int) -> np.ndarray:
    """Positions of a point moving at constant speed and reflecting off [lo, hi]."""
    span = hi - lo
    raw = start - lo + velocity * np.arange(frames)
    folded = np.mod(raw, 2 * span)
    return lo + np.where(folded > span, 2 * span - folded, folded)


def render_video(rng: np.random.Generator, label: int, frames: int, height: int, width: int) -> np.ndarray:
    """One video (3, F, H, W) in [-1, 1]."""
    r = rng.uniform(0.2, 0.28) * min(height, width)
    speed = rng.uniform(0.06, 0.12) * min(height, width)
    angle = rng.uniform(0, 2 * np.pi)
    ys = bounce(rng.uniform(r, height - r), speed * np.sin(angle), r, height - r, frames)
    xs = bounce(rng.uniform(r, width - r), speed * np.cos(angle), r, width - r, frames)
    color = np.clip(CLASS_COLORS[label] + rng.normal(0, 0.05, 3), 0, 1)
    gy, gx = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    video = np.empty((3, frames, height, width), np.float32)
    for f in range(frames):
        mask = shape_mask(label, gy - ys[f], gx - xs[f], r)                       # (H, W)
        video[:, f] = (color[:, None, None] * mask[None]) * 2 - 1
    return video


class MovingShapes:
    """Indexable dataset: item i -> (video (3, F, H, W) float32 in [-1, 1], label)."""

    def __init__(self, frames: int = 8, height: int = 16, width: int = 16,
                 num_classes: int = len(CLASS_NAMES), seed: int = 0):
        if not 1 <= num_classes <= len(CLASS_NAMES):
            raise VditError(f"Moving Shapes has 1..{len(CLASS_NAMES)} classes, got {num_classes}")
        self.frames, self.height, self.width = frames, height, width
        self.num_classes, self.seed = num_classes, seed

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng([self.seed, i])
        label = int(rng.integers(self.num_classes))
        return render_video(rng, label, self.frames, self.height, self.width), label

    def batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        items = [self[int(i)] for i in indices]
        return np.stack([v for v, _ in items]), np.array([l for _, l in items], np.int64)
