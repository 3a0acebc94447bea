"""Prove an export computes what PyTorch computes, on inputs from a real sampling trajectory.

For each batch size, a DDIM sample (eta=1: noise on every step, guidance 2) is run with the PyTorch
model (the labels or random conditioning of its contract) and a few of its steps are replayed through
ONNX Runtime; an eps+var model's step graph is fed DDPM's learned-variance coefficients at those steps,
so its variance path is checked too. Every graph of the directory is
checked, each precision variant against its own tolerance (PRECISION_TOLERANCE; `tolerance` sets
fp32's): a denoiser graph on the 2B cond+null rows the guided step feeds it (in pieces its batch
range takes), a step graph on the step's inputs. What is not checked is listed, and a directory where
nothing could be checked fails.

Errors are relative L2, ||ort - torch|| / ||scale||, with the scale following how well conditioned the
output is. For eps it is ||eps||. A step's x_prev = c_x0 clip(a x - b eps) + c_xt x + c_eps eps_hat
+ sigma z is a sum whose terms can be far larger than the result (near t = T, a and b ~ 1/sqrt(alpha_bar)
are in the hundreds and cancel), and float32 rounds each term: the scale is the elementwise sum of the
terms' magnitudes, so a step is held to the accuracy its arithmetic allows, and an error in eps of
relative size r moves x_prev by about r times that scale. Where the terms do not cancel it equals
||x_prev||. Where polygraphy is installed the fp32 denoiser's feeds and PyTorch outputs also go
through its comparator (and are saved so `polygraphy run denoiser.onnx --onnxrt --load-inputs ...
--load-outputs ...` repeats the check with a tool users know).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from vdit_deploy.samplers import apply_step, ddpm_steps, guide, guided_step, make_steps
from vdit_deploy.errors import VditError
from vdit_deploy.export.metadata import NULL_PREFIX, STEP_STATE, check_export_dir
from vdit_deploy.export.variants import (CACHE_KINDS, DENOISER, FP16, FP32, INT8_DYNAMIC, INT8_QDQ, STEP,
                                         variant_file)
from vdit_deploy.export.graph_compare import Comparison, _session, pieces, step_scale
from vdit_deploy.progress import bar, note

FP32_TOLERANCE = 1e-4
# Lossy variants: the mean relative L2 over the replayed calls against PyTorch fp32. Their worst calls,
# near t = 0, reach several times the mean, so the mean is what is held. Measured on the shipped checkpoint
# (10-step eta=1 trajectory, a 1-seed 4-timestep calibration set): fp16 2.7e-3, int8-dynamic 4.5e-2, int8-qdq
# 9.8e-2; the tolerances leave 3-7x for other models and sets, and a broken graph is off by ~1.
PRECISION_TOLERANCE = {FP32: FP32_TOLERANCE, FP16: 2e-2, INT8_DYNAMIC: 2e-1, INT8_QDQ: 3e-1}   # by graph


@dataclass
class VerifyReport:
    tolerance: float                      # fp32's; each row carries its own
    rows: list[Comparison] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    polygraphy: str = "not installed"

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    def table(self) -> str:
        lines = [f"{'graph':<24} {'output':<7} {'calls':>5} {'max abs':>10} {'rel L2':>10} {'error':>10} "
                 f"{'tolerance':>9}"]
        for r in self.rows:
            lines.append(f"{r.graph:<24} {r.output:<7} {r.calls:>5} {r.max_abs:>10.3e} {r.rel_l2:>10.3e} "
                         f"{r.error:>10.3e} {r.tolerance:>9.0e}  {'ok' if r.ok else 'FAIL'}")
        lines.append("the error column: relative L2 against the output's conditioning scale (export/verify.py), worst call "
                     "for fp32, mean over calls for fp16/int8")
        lines += [f"skipped: {s}" for s in self.skipped]
        lines.append(f"polygraphy: {self.polygraphy}")
        return "\n".join(lines)


def record_trajectory(torch_rt, batch: int, num_steps: int, picks: int, seed: int = 0, guidance: float = 2.0,
                      progress: bool = False):
    """Sample with the PyTorch runtime and keep `picks` evenly spaced steps: their inputs
    (x_t, t, cond, null, guidance, coefs, noise) and the guided model output. An eps+var model's steps
    carry DDPM's learned-variance coefs at the same t (the step graph's variance path)."""
    from vdit_deploy.sampling import sample

    contract = torch_rt.contract
    if contract.schedule.kind == "flow":   # flow euler, re-noised at each step where the schedule allows it
        plan = make_steps(replace(contract.schedule, stochastic=not contract.schedule.invert), "euler", num_steps,
                          prediction="flow")
    else:
        plan = make_steps(torch_rt.schedule, "ddim", num_steps, eta=1.0, prediction=contract.prediction)
    ddpm = ddpm_steps(torch_rt.schedule, prediction=contract.prediction, learned_variance=True) \
        if contract.output == "eps+var" else None
    keep = set(np.linspace(0, len(plan) - 1, picks).round().astype(int).tolist())
    records = []

    class Recorder:
        def step(self, x, t, cond, g, coefs, noise, state=None):
            b, raw = len(x), []
            null = contract.null_batch(torch_rt.null, cond)
            step = guided_step(lambda *a: raw.append(torch_rt.denoise(*a)) or raw[-1], x, t, cond, null, g, coefs,
                               noise, state)
            out = raw[0] if g == 1.0 else guide(raw[0][:b], raw[0][b:], g, x.shape[1])
            if len(seen) in keep:
                check_coefs = coefs if ddpm is None else ddpm[len(ddpm) - 1 - t].coefs
                records.append(((x, t, cond, null, g, check_coefs, noise), out))
            seen.append(t)
            return step

    seen: list[int] = []
    if contract.label_input() is not None:
        cond = contract.labels([(seed + i) % contract.label_input().classes for i in range(batch)])
    else:
        # prompts as long as the null conditioning: a guided step pairs them (contract.null_batch)
        cond = contract.example_cond(batch, np.random.default_rng(seed), contract.axis_sizes(torch_rt.null))
    sample(Recorder(), contract, cond, plan, guidance, seed, progress=progress)
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
           polygraphy: bool = True, save_polygraphy: str | Path | None = None, progress: bool = False,
           source=None, class_name: str | None = None) -> VerifyReport:
    """Compare ORT and PyTorch on every vdit graph of the export directory. source: the Source it was
    exported from (export_source's; default: the model directory it records or `checkpoint`).
    class_name: the user's --class, needed (and imported) only for a model that is not one of
    diffusers' own classes. progress: a line per stage and a bar per trajectory step and per graph on
    stderr (progress.py)."""
    from vdit_deploy.runtimes.torch_runtime import TorchRuntime
    from vdit_deploy.sources import load_export_source

    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise VditError(f"{export_dir}: no such export directory")
    report = VerifyReport(tolerance)
    graphs = check_export_dir(export_dir, report.skipped)   # one checkpoint, config and schedule
    if not graphs:
        raise VditError(f"{export_dir} holds no vdit graph to verify"
                        + (f" ({'; '.join(report.skipped)})" if report.skipped else ""))
    meta = next(iter(graphs.values()))
    if source is None:
        source = load_export_source(meta, export_dir, checkpoint, class_name=class_name)
    elif source.contract.sha256() != meta.contract.sha256():
        raise VditError(f"{export_dir} was not exported from this Source (its contract differs)")
    tolerances = {**PRECISION_TOLERANCE, "fp32": tolerance}
    # every graph's batch range decides the videos per step replayed: steps need B in range, denoisers 2B rows
    sizes = set()
    for m in graphs.values():
        lo, hi = m.batch_range()
        if m.kind == STEP:
            sizes |= {min(max(b, lo), hi) for b in batches}
        else:
            sizes |= {min(max(b, -(-lo // 2)), max(hi // 2, -(-lo // 2))) for b in batches}
    torch_rt = TorchRuntime(source.path, device="cpu", source=source)
    if progress:
        note(f"verify 1/2: PyTorch trajectories ({num_steps} DDIM steps at batch {', '.join(map(str, sorted(sizes)))})")
    trajectories = {b: record_trajectory(torch_rt, b, num_steps, picks, seed, progress=progress)
                    for b in sorted(sizes)}
    if progress:
        note(f"verify 2/2: {len(graphs)} graph(s) against PyTorch on {picks} steps each")
    feeds, refs = [], []
    for path, m in bar(graphs.items(), show=progress, desc="verify", unit="graph"):
        if m.kind in CACHE_KINDS:   # step caching's split graphs: checked in pairs below
            continue
        row = Comparison(path.name, "x_prev" if m.kind == STEP else "out", tolerances[m.precision],
                         "worst" if m.precision == "fp32" else "mean")
        session = _session(path)
        lo, hi = m.batch_range()
        for b, records in trajectories.items():
            for (x, t, cond, null, g, coefs, noise), out in records:
                if m.kind == STEP:
                    if lo <= b <= hi:
                        feed = {"x_t": x, "t": np.full(b, t, np.float32), **cond,
                                **{NULL_PREFIX + k: v for k, v in null.items()}, "guidance": np.float32([g]),
                                "coefs": coefs, "noise": noise}
                        # a DDIM trajectory carries no solver state: zeros, as at a multistep solver's first step
                        feed.update({name: np.zeros_like(x) for name, _ in STEP_STATE})
                        got = session.run(["x_prev"], feed)[0]
                        row.add(got, apply_step(x, out, coefs, noise), step_scale(x, out, coefs, noise))
                    continue
                # the denoiser call a host-side guided step makes: cond + null as one 2B batch
                xx, tt = np.concatenate([x, x]), np.full(2 * b, t, np.float32)
                both = {k: np.concatenate([cond[k], null[k]]) for k in cond}
                for i, j in pieces(2 * b, lo, hi):
                    feed = {"x_t": xx[i:j], "t": tt[i:j], **{k: v[i:j] for k, v in both.items()}}
                    ref = torch_rt.denoise(feed["x_t"], feed["t"], {k: v[i:j] for k, v in both.items()})
                    row.add(session.run(None, feed)[0], ref)
                    if path.name == variant_file(DENOISER):
                        feeds.append(feed)
                        refs.append({"out": ref})
        if row.calls:
            report.rows.append(row)
        else:
            report.skipped.append(f"{path.name}: no replayed call fits its batch range {lo}..{hi}")
    if any(m.kind in CACHE_KINDS for m in graphs.values()):
        from vdit_deploy.export.cache_export import verify_rows
        report.rows += verify_rows(export_dir, graphs, trajectories, torch_rt, tolerance)
    if polygraphy and feeds:
        report.polygraphy = _polygraphy_compare(export_dir / variant_file(DENOISER), feeds, refs, tolerance,
                                                save_polygraphy)
    torch_rt.close()
    return report


def check(report: VerifyReport, export_dir) -> VerifyReport:
    """Raise a one-line VditError when nothing was checked or any output is above its tolerance."""
    if not report.rows:
        raise VditError(f"verify checked nothing in {export_dir}: {'; '.join(report.skipped) or 'no graphs'}")
    bad = [r for r in report.rows if not r.ok]
    if bad:
        worst = max(bad, key=lambda r: r.error / r.tolerance)
        raise VditError(f"{export_dir} does not match PyTorch: {worst.graph} {worst.output} error "
                        f"{worst.error:.3e} > tolerance {worst.tolerance:g}")
    return report
