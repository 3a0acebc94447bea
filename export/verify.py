"""Prove an export computes what PyTorch computes, on inputs from a real sampling trajectory.

For each batch size, a DDIM sample (eta=1: noise on every step, guidance 2) is run with the PyTorch
checkpoint and a few of its steps are replayed through ONNX Runtime: denoiser.onnx on the 2B
cond+null batch the guided step feeds it, and step.onnx on the step's inputs. Errors are reported
per output as max-abs and relative L2 (||ort - torch|| / ||torch||); above `tolerance` it fails.
Where polygraphy is installed the same feeds and PyTorch outputs also go through its comparator
(and are saved so `polygraphy run denoiser.onnx --onnxrt --load-inputs ... --load-outputs ...`
repeats the check with a tool users know).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vdit_deploy.diffusion import guided_step, make_steps
from vdit_deploy.errors import VditError
from vdit_deploy.export.metadata import DENOISER, STEP, find_onnx, read_metadata
from vdit_deploy.files import sha256_file

FP32_TOLERANCE = 1e-4


@dataclass
class Comparison:
    graph: str            # denoiser | step
    output: str
    max_abs: float = 0.0
    rel_l2: float = 0.0   # worst call
    calls: int = 0

    def add(self, got: np.ndarray, ref: np.ndarray) -> None:
        got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
        self.max_abs = max(self.max_abs, float(np.abs(got - ref).max()))
        self.rel_l2 = max(self.rel_l2, float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)))
        self.calls += 1


@dataclass
class VerifyReport:
    tolerance: float
    rows: list[Comparison] = field(default_factory=list)
    polygraphy: str = "not installed"

    @property
    def ok(self) -> bool:
        return all(r.rel_l2 <= self.tolerance and np.isfinite(r.rel_l2) for r in self.rows)

    def table(self) -> str:
        lines = [f"{'graph':<9} {'output':<7} {'calls':>5} {'max abs':>10} {'rel L2':>10}  (tolerance {self.tolerance:g})"]
        for r in self.rows:
            flag = "ok" if r.rel_l2 <= self.tolerance else "FAIL"
            lines.append(f"{r.graph:<9} {r.output:<7} {r.calls:>5} {r.max_abs:>10.3e} {r.rel_l2:>10.3e}  {flag}")
        lines.append(f"polygraphy: {self.polygraphy}")
        return "\n".join(lines)


def record_trajectory(torch_rt, batch: int, num_steps: int, picks: int, seed: int = 0, guidance: float = 2.0):
    """Sample with the PyTorch runtime and keep `picks` evenly spaced steps' inputs
    (x_t, t, y, guidance, coefs, noise) and outputs x_prev."""
    from vdit_deploy.sampling import sample

    cfg = torch_rt.config
    plan = make_steps(torch_rt.schedule, "ddim", num_steps, eta=1.0)
    keep = set(np.linspace(0, len(plan) - 1, picks).round().astype(int).tolist())
    records = []

    class Recorder:
        def step(self, x, t, y, g, coefs, noise, state=None):
            out = guided_step(torch_rt.denoise, x, t, y, g, coefs, noise, cfg.null_label, state)
            if len(records_seen) in keep:
                records.append(((x, t, y, g, coefs, noise), out))
            records_seen.append(t)
            return out

    records_seen: list[int] = []
    labels = [(seed + i) % cfg.num_classes for i in range(batch)]
    sample(Recorder(), cfg, labels, plan, guidance, seed)
    return records


def _polygraphy_compare(path: Path, feeds: list[dict], refs: list[dict], tolerance: float, save_dir) -> str:
    try:
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.comparator import Comparator, RunResults
        from polygraphy.comparator.struct import IterationResult
        from polygraphy.json import save_json
    except ImportError:
        return "not installed (pip install polygraphy to cross-check)"
    import logging

    from polygraphy.logger import G_LOGGER
    G_LOGGER.module_severity = G_LOGGER.ERROR
    logging.getLogger("polygraphy").setLevel(logging.ERROR)
    runner = OnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"]))
    results = Comparator.run([runner], data_loader=feeds)
    results.append(("pytorch", [IterationResult(outputs=r, runner_name="pytorch") for r in refs]))
    # rel L2 has no polygraphy twin: compare elementwise, with atol at tolerance x the output scale.
    scale = max(float(np.abs(r[k]).max()) for r in refs for k in r)
    try:
        from polygraphy.comparator import SimpleCompareFunc as simple   # polygraphy >= 0.50
    except ImportError:
        from polygraphy.comparator import CompareFunc
        simple = CompareFunc.simple
    passed = bool(Comparator.compare_accuracy(results, compare_func=simple(rtol=tolerance * 10,
                                                                            atol=tolerance * scale)))
    if save_dir is not None:
        save_json(feeds, str(Path(save_dir) / f"{path.stem}.inputs.json"))
        ref = RunResults()
        ref.append(("pytorch", [IterationResult(outputs=r, runner_name="pytorch") for r in refs]))
        ref.save(str(Path(save_dir) / f"{path.stem}.torch_outputs.json"))
    return f"{path.name} {'passed' if passed else 'FAILED'} (rtol {tolerance * 10:g}, atol {tolerance * scale:.2g})"


def verify(export_dir: str | Path, checkpoint: str | Path | None = None, tolerance: float = FP32_TOLERANCE,
           batches: tuple[int, ...] = (1, 3), num_steps: int = 10, picks: int = 4, seed: int = 0,
           polygraphy: bool = True, save_polygraphy: str | Path | None = None) -> VerifyReport:
    """Compare ORT and PyTorch on the export dir's denoiser.onnx (and step.onnx when present)."""
    from vdit_deploy.runtimes.ort_runtime import OrtRuntime
    from vdit_deploy.runtimes.torch_runtime import TorchRuntime

    export_dir = Path(export_dir)
    den_path = find_onnx(export_dir, DENOISER)
    meta = read_metadata(den_path)
    checkpoint = Path(checkpoint or meta.checkpoint_path or "")
    if not str(checkpoint) or not (checkpoint / "model.safetensors").is_file():
        raise VditError(f"{export_dir}: its source checkpoint {str(checkpoint) or '(unknown)'} is not there; "
                        "pass --checkpoint")
    if sha256_file(checkpoint / "model.safetensors") != meta.checkpoint_sha256:
        raise VditError(f"{checkpoint} is not the checkpoint {export_dir} was exported from (sha256 differs)")
    ort_rt, torch_rt = OrtRuntime(export_dir, spin=False), TorchRuntime(checkpoint, device="cpu")
    lo, hi = ort_rt.fused.meta.batch_range() if ort_rt.fused else (ort_rt.graph.lo, ort_rt.graph.hi // 2)
    batches = sorted({min(max(b, lo), hi) for b in batches})
    report = VerifyReport(tolerance)
    den = Comparison(DENOISER, "eps")
    stp = Comparison(STEP, "x_prev") if ort_rt.fused else None
    feeds, refs = [], []
    null = ort_rt.config.null_label
    for b in batches:
        for (x, t, y, g, coefs, noise), x_prev in record_trajectory(torch_rt, b, num_steps, picks, seed):
            # the denoiser call a host-side guided step makes: cond + null as one 2B batch
            xx, tt = np.concatenate([x, x]), np.full(2 * b, t, np.float32)
            yy = np.concatenate([y, np.full(b, null, np.int32)])
            if ort_rt.graph.lo <= 2 * b <= ort_rt.graph.hi:
                ref = torch_rt.denoise(xx, tt, yy)
                den.add(ort_rt.denoise(xx, tt, yy), ref)
                feeds.append({"x_t": xx, "t": tt, "y": yy})
                refs.append({"eps": ref})
            if stp is not None:
                stp.add(np.asarray(ort_rt.step(x, t, y, g, coefs, noise)), x_prev)   # guided: the fused graph
    report.rows = [r for r in (den, stp) if r is not None and r.calls]
    if polygraphy and feeds:
        report.polygraphy = _polygraphy_compare(den_path, feeds, refs, tolerance, save_polygraphy)
    ort_rt.close()
    torch_rt.close()
    return report


def check(report: VerifyReport, export_dir) -> VerifyReport:
    """Raise a one-line VditError when any output of `report` is above tolerance."""
    if not report.ok:
        worst = max(report.rows, key=lambda r: r.rel_l2)
        raise VditError(f"{export_dir} does not match PyTorch: {worst.graph}.onnx {worst.output} relative L2 "
                        f"{worst.rel_l2:.3e} > tolerance {report.tolerance:g}")
    return report
