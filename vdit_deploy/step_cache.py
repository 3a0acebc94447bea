"""Step caching: skip most of the denoiser on steps where its input barely changed (numpy, torch-free).

A cached sampler step runs the split graphs of `vdit export --cache-split K` (export/cache_export.py):

    head  embeddings + the first K blocks -> hidden h_K, the probes the criteria read (the first
          blocks' residual h_K - h_0, the first block's timestep-modulated input), their L1 change
          against the references the runtime keeps (`stats`), and the output of a skipped step:
          final_layer(h_K + R), R the tail residual cached at the last full step
    tail  the remaining blocks and the final layer on h_K -> the output, and R = h_N - h_K to cache

The runtime runs the head, hands the four `stats` scalars to StepCache.decide, and runs the tail only
when the step is not skipped. Every runtime (ONNX Runtime, PyTorch, TensorRT) calls this one policy
with its head's stats, so they take the same decisions for the same inputs.

Criteria (the change is over the whole call: every video, cond and null rows together):
  fbcache   (FirstBlockCache, ParaAttention / diffusers): skip while the relative L1 change of the head
            residual since the last full step is under the threshold;
  teacache  (TeaCache, Liu et al. 2024): add up poly(relative L1 change of the modulated input since
            the previous step), the polynomial fitted per model (`vdit calibrate cache`: how much the
            model output changes for a given input change); skip while the sum is under the threshold,
            reset it at each full step.
Both: the first and last `warmup` steps always run in full, and at most `max_skips` steps in a row
are skipped (a skipped step's output drifts from the cached residual's step).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vdit_deploy.errors import VditError

MODES = ("off", "fbcache", "teacache")
DEFAULT_THRESHOLD = {"fbcache": 0.08, "teacache": 0.1}
DEFAULT_WARMUP = 2
DEFAULT_MAX_SKIPS = 3
# the head's `stats` output, in order (sums over the whole call)
STATS = ("residual_diff", "residual_norm", "modulated_diff", "modulated_norm")
# the inputs the runtime keeps between steps and feeds the head (zeros before the first full step)
REFS = ("residual_ref", "modulated_ref", "tail_residual")


@dataclass(frozen=True)
class CachePolicy:
    mode: str = "fbcache"
    threshold: float | None = None          # None: DEFAULT_THRESHOLD[mode]
    warmup: int = DEFAULT_WARMUP            # first and last `warmup` steps always full
    max_skips: int = DEFAULT_MAX_SKIPS      # skipped steps in a row at most
    poly: tuple = (1.0, 0.0)                # teacache: rescale polynomial, highest power first (np.polyval)

    def __post_init__(self):
        if self.mode not in MODES or self.mode == "off":
            raise VditError(f"cache mode must be one of {', '.join(m for m in MODES if m != 'off')}, got {self.mode!r}")
        if self.threshold is not None and not (np.isfinite(self.threshold) and self.threshold >= 0):
            raise VditError(f"cache threshold must be a finite number >= 0, got {self.threshold}")
        if self.warmup < 0 or self.max_skips < 0:
            raise VditError(f"cache warmup and max skips must be >= 0, got {self.warmup} and {self.max_skips}")
        if not self.poly or not all(np.isfinite(c) for c in self.poly):
            raise VditError(f"teacache polynomial must be finite coefficients, got {list(self.poly)}")

    @property
    def limit(self) -> float:
        return DEFAULT_THRESHOLD[self.mode] if self.threshold is None else float(self.threshold)

    def start(self, steps: int) -> "StepCache":
        """The cache of one trajectory of `steps` steps."""
        return StepCache(self, steps)

    def describe(self) -> str:
        return f"{self.mode} threshold {self.limit:g}, warmup {self.warmup}, max {self.max_skips} skips in a row"


@dataclass
class StepCache:
    """One trajectory's decisions. The runtime keeps its reference tensors (REFS) in `refs` (host arrays
    or device handles, None before the first full step: read as zeros), calls decide() once per step
    with its head's stats, and replaces the refs after the step (update_refs)."""
    policy: CachePolicy
    steps: int
    index: int = 0                          # the step being decided
    run_of_skips: int = 0
    accumulated: float = 0.0                # teacache's sum since the last full step
    have_residual: bool = False             # a full step has cached a tail residual
    decisions: list = field(default_factory=list)   # True: skipped, per step
    signals: list = field(default_factory=list)     # the criterion's value per step (nan when forced full)
    stats: list = field(default_factory=list)       # the head's stats per step (what decided it)
    refs: dict = field(default_factory=lambda: dict.fromkeys(REFS))

    def decide(self, stats) -> bool:
        """The head's stats (STATS order) of this step -> whether to skip the tail."""
        p, i = self.policy, self.index
        s = np.asarray(stats, np.float64).reshape(-1)
        if s.shape != (len(STATS),):
            raise VditError(f"the cache head gave {s.size} stats, expected {len(STATS)} ({', '.join(STATS)})")
        forced = (not self.have_residual or i < p.warmup or i >= self.steps - p.warmup
                  or self.run_of_skips >= p.max_skips)
        if p.mode == "fbcache":
            signal = s[0] / s[1] if s[1] > 0 else np.inf
        else:
            change = s[2] / s[3] if s[3] > 0 else np.inf
            # the rescaled change; a fit may dip below 0 off its data
            signal = self.accumulated + max(float(np.polyval(p.poly, change)), 0.0) if np.isfinite(change) else np.inf
        skip = bool(not forced and np.isfinite(signal) and signal < p.limit)
        if p.mode == "teacache":
            self.accumulated = signal if skip else 0.0
        self.run_of_skips = self.run_of_skips + 1 if skip else 0
        self.have_residual = True              # a full step caches one; a skip keeps the old
        self.decisions.append(skip)
        self.stats.append(s.tolist())
        self.signals.append(float(signal) if not forced else float("nan"))
        self.index += 1
        return skip

    def update_refs(self, skipped: bool, residual, modulated, tail_residual=None) -> None:
        """After a step: fbcache compares with the residual of the last full step, teacache with the
        previous step's modulated input; a full step caches its tail residual."""
        if not skipped:
            self.refs["residual_ref"] = residual
            self.refs["tail_residual"] = tail_residual
        self.refs["modulated_ref"] = modulated

    @property
    def full_steps(self) -> int:
        return len(self.decisions) - sum(self.decisions)


def policy_for(rt, mode: str, threshold=None, warmup: int = DEFAULT_WARMUP, max_skips: int = DEFAULT_MAX_SKIPS,
               poly=None, fit_dir=None) -> CachePolicy:
    """The policy for a runtime: teacache reads its polynomial from CACHE_FIT_FILE (`vdit calibrate
    cache`) in `fit_dir`, by default beside what the runtime loaded (an export; a torch runtime's
    checkpoint), unless given."""
    if mode == "teacache" and poly is None:
        from vdit_deploy.export.variants import CACHE_FIT_FILE

        where = Path(fit_dir) if fit_dir is not None else Path(rt.files[0]).parent
        poly = load_fit(where / CACHE_FIT_FILE, getattr(getattr(rt, "source", None), "sha256", None) or
                        _export_sha(rt))
    return CachePolicy(mode, threshold, warmup, max_skips, tuple(poly) if poly is not None else (1.0, 0.0))


def _export_sha(rt) -> str | None:
    from vdit_deploy.export.metadata import read_metadata

    first = Path(rt.files[0])
    return read_metadata(first).checkpoint_sha256 if first.suffix == ".onnx" else None


def rel_l1_stats(residual, residual_ref, modulated, modulated_ref) -> np.ndarray:
    """STATS in numpy (float64 sums), what the head graphs compute: for tests and host-side heads."""
    a = lambda x: np.asarray(x, np.float64)
    return np.array([np.abs(a(residual) - a(residual_ref)).sum(), np.abs(a(residual_ref)).sum(),
                     np.abs(a(modulated) - a(modulated_ref)).sum(), np.abs(a(modulated_ref)).sum()])


# ---- teacache's polynomial: fitted per model ---------------------------------------------------------
FIT_FORMAT = "vdit-cache-fit/1"


def fit_poly(input_change, output_change, degree: int = 4) -> tuple:
    """TeaCache's rescaling: a polynomial from the modulated input's relative L1 change between
    consecutive steps to the model output's (least squares, numpy.polyfit). Fewer points than
    coefficients are refused."""
    x, y = np.asarray(input_change, np.float64), np.asarray(output_change, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < degree + 2:
        raise VditError(f"fitting a degree-{degree} polynomial needs at least {degree + 2} step pairs, got {x.size}: "
                        "collect more seeds or steps")
    return tuple(float(c) for c in np.polyfit(x, y, degree))


def save_fit(path: Path, poly: tuple, meta: dict) -> None:
    from vdit_deploy.files import atomic_path

    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps({"format": FIT_FORMAT, "poly": list(poly), **meta}, indent=1) + "\n")


def load_fit(path: Path, checkpoint_sha256: str | None = None) -> tuple:
    """The polynomial `vdit calibrate cache` wrote, refused when it is for another checkpoint."""
    from vdit_deploy import validate as v

    path = Path(path)
    if not path.is_file():
        raise VditError(f"{path.parent} has no {path.name}: teacache needs the polynomial `vdit calibrate cache "
                        f"{path.parent}` fits for this model")
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:
        raise VditError(f"{path} is not valid JSON: {str(e)[:100]}") from None
    v.obj(data, "cache fit", required=("format", "poly", "checkpoint_sha256"), where=str(path), extra_ok=True)
    if data["format"] != FIT_FORMAT:
        v.fail(str(path), f"format must be {FIT_FORMAT!r}, got {v.show(data['format'])}")
    poly = data["poly"]
    if not isinstance(poly, list) or not poly or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and np.isfinite(c) for c in poly):
        v.fail(str(path), "poly must be a list of finite numbers")
    if checkpoint_sha256 and data["checkpoint_sha256"] != checkpoint_sha256:
        raise VditError(f"{path} was fitted for checkpoint sha256:{str(data['checkpoint_sha256'])[:12]}, not this "
                        f"export's sha256:{checkpoint_sha256[:12]}; run `vdit calibrate cache` again")
    return tuple(float(c) for c in poly)
