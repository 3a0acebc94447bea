"""PNG plots for reports (matplotlib, the `[report]` extra), written atomically, never shown."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vdit_deploy.files import atomic_path


def pyplot():
    import matplotlib
    matplotlib.use("Agg")   # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    pyplot().close(fig)
    return path


def plot_error_vs_timestep(curves: list[tuple[str, list, list]], path: Path, ylabel: str) -> Path:
    """curves: (label, timesteps, eps relative L2 at each) -> a log-scale line per curve."""
    fig, ax = pyplot().subplots(figsize=(6, 3.2), dpi=80)
    for label, timesteps, errors in curves:
        ax.plot(timesteps, np.maximum(errors, 1e-12), marker=".", label=label)
    ax.set_yscale("log")
    ax.invert_xaxis()   # sampling runs from t = T-1 down to 0
    ax.set_xlabel("timestep t (sampling order →)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save(fig, path)
