"""What verify and the split-graph checks share: a comparison row, the step's error scale, an ONNX
Runtime session for one graph, and the pieces a batch is fed in."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.samplers import COEF_NAMES


@dataclass
class Comparison:
    graph: str            # file name
    output: str
    tolerance: float
    statistic: str = "worst"   # over calls: fp32 is held to its worst call, a lossy variant to its mean
    max_abs: float = 0.0
    rel_l2: float = 0.0   # worst call, ||got - ref|| / ||ref||
    errors: list[float] = field(default_factory=list)   # per call, ||got - ref|| / ||scale||

    def add(self, got: np.ndarray, ref: np.ndarray, scale: np.ndarray | None = None) -> None:
        got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
        diff = float(np.linalg.norm(got - ref))
        if not np.isfinite(diff):           # NaN/inf in the graph's output
            diff = math.inf
        self.max_abs = max(self.max_abs, float(np.abs(got - ref).max()) if diff < math.inf else math.inf)
        self.rel_l2 = max(self.rel_l2, diff / max(float(np.linalg.norm(ref)), 1e-30))
        self.errors.append(diff / max(float(np.linalg.norm(ref if scale is None else scale)), 1e-30))

    @property
    def calls(self) -> int:
        return len(self.errors)

    @property
    def error(self) -> float:
        return max(self.errors) if self.statistic == "worst" else float(np.mean(self.errors))

    @property
    def ok(self) -> bool:
        return self.calls > 0 and self.error <= self.tolerance


def step_scale(x_t: np.ndarray, out: np.ndarray, coefs: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Elementwise sum of the magnitudes of the terms of samplers.apply_step (float64): the size
    float32 rounding and an error in the model output are relative to."""
    c = dict(zip(COEF_NAMES, np.asarray(coefs, np.float64)))
    x, o = np.asarray(x_t, np.float64), np.asarray(out, np.float64)
    e = o[:, :x.shape[1]]
    ax, be = np.abs(c["a"] * x), np.abs(c["b"] * e)
    x0 = np.clip(c["a"] * x - c["b"] * e, -c["clip"], c["clip"])
    scale = abs(c["c_x0"]) * (ax + be) + np.abs(c["c_xt"] * x) + abs(c["c_eps"]) * (ax + np.abs(x0)) / abs(c["b"])
    std = c["sigma"]
    if o.shape[1] == 2 * x.shape[1] and c["learned_var"]:    # the learned std, a term of its own
        frac = (o[:, x.shape[1]:] + 1) / 2
        std = std + c["learned_var"] * np.exp(0.5 * (c["log_var_min"] + frac * (c["log_var_max"] - c["log_var_min"])))
    return scale + np.abs(std * np.asarray(noise, np.float64))


def _session(path: Path):
    """ONNX Runtime on the CPU; idle threads sleep instead of spinning (torch shares the process)."""
    import onnxruntime as ort

    from vdit_deploy.threads import session_options

    options = session_options()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise VditError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}") from None


def pieces(rows: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """[start, end) slices of `rows` rows that a graph taking lo..hi rows per call accepts."""
    return [(i, min(i + hi, rows)) for i in range(0, rows, hi) if min(i + hi, rows) - i >= lo]
