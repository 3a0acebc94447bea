"""`vdit calibrate cache`: TeaCache's rescaling polynomial for one model, fitted on a calibration set.

TeaCache skips a step while the accumulated change of the first block's timestep-modulated input is
small, but that change is not the model output's: their relation depends on the model and the
schedule, so it is fitted per model (Liu et al. 2024 fit a polynomial per model the same way).
For each pair of consecutive steps a calibration set recorded (collect with --timesteps equal to the
sampler's steps to record them all), the export's cache head and tail (export/cache_export.py) give the
modulated input and the output of both calls; the relative L1 change of one against the other's is a
point, and step_cache.fit_poly fits output change = poly(input change). The fit is written beside the
graphs (variants.CACHE_FIT_FILE) with the checkpoint hash it belongs to.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.export.cache_export import REF_INPUTS, head_outputs, tail_inputs
from vdit_deploy.export.variants import CACHE_FIT_FILE, DENOISER_HEAD, DENOISER_TAIL
from vdit_deploy.step_cache import fit_poly, save_fit


def _rel_l1(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).sum() / max(np.abs(b).sum(), 1e-30))


def fit_cache(export_dir, calib_dir, degree: int = 2, threads: int | None = None) -> dict:
    """Fit and write export_dir/CACHE_FIT_FILE -> what was written (poly, points, residual)."""
    from vdit_deploy.calibration.collect import load_calibration_set, onnx_session
    from vdit_deploy.export.metadata import find_onnx, read_metadata

    export_dir = Path(export_dir)
    head_path, tail_path = find_onnx(export_dir, DENOISER_HEAD), find_onnx(export_dir, DENOISER_TAIL)
    meta = read_metadata(head_path)
    cset = load_calibration_set(calib_dir, meta.checkpoint_sha256, meta.contract)   # this model's, or refused
    records = cset.manifest["records"]
    steps = {(r["seed"], r["step"]) for r in records}
    pairs = [(r, s) for r in records for s in records if s["seed"] == r["seed"] and s["step"] == r["step"] + 1]
    if len(pairs) < degree + 2:
        raise VditError(f"calibration set {calib_dir} holds {len(pairs)} pairs of consecutive steps ({len(steps)} "
                        f"calls); the fit needs {degree + 2}: collect it with --timesteps equal to --steps")
    head, tail = onnx_session(head_path, threads), onnx_session(tail_path, threads)
    lo, hi = meta.batch_range()
    dims = {i.name: [int(d) for d in i.shape[1:]] for i in head.get_inputs() if i.name in REF_INPUTS}
    cache = meta.cache
    probes = {}

    def probe(record):
        """The modulated input and the output of one recorded call (in pieces the graphs take)."""
        key = (record["seed"], record["step"])
        if key not in probes:
            start, end = record["rows"]
            mods, outs = [], []
            for i in range(start, end, hi):
                feed = cset.rows(i, min(i + hi, end))
                n = len(feed["t"])
                if n < lo:
                    raise VditError(f"a recorded call of {n} rows is under the cache head's batch minimum {lo}")
                feed.update({name: np.zeros((n, *d), np.float32) for name, d in dims.items()})
                got = dict(zip(head_outputs(cache, False), head.run(None, feed)))
                mods.append(got["modulated"])
                outs.append(tail.run(["out"], {k: got[k] for k in tail_inputs(cache, False)})[0])
            probes[key] = (np.concatenate(mods), np.concatenate(outs))
        return probes[key]

    x, y = [], []
    for prev, now in sorted(pairs, key=lambda p: (p[0]["seed"], p[0]["step"])):
        (m0, o0), (m1, o1) = probe(prev), probe(now)
        x.append(_rel_l1(m1, m0))
        y.append(_rel_l1(o1, o0))
    poly = fit_poly(x, y, degree)
    residual = float(np.sqrt(np.mean((np.polyval(poly, x) - np.asarray(y)) ** 2)))
    facts = {"checkpoint_sha256": meta.checkpoint_sha256, "calibration_set": str(Path(calib_dir).resolve()),
             "sampler": cset.manifest["sampler"], "steps": cset.manifest["steps"],
             "guidance": cset.manifest["guidance"], "degree": degree, "points": len(x),
             "input_change": [float(v) for v in x], "output_change": [float(v) for v in y], "rms_residual": residual}
    save_fit(export_dir / CACHE_FIT_FILE, poly, facts)
    return {"poly": poly, **facts, "path": export_dir / CACHE_FIT_FILE}
