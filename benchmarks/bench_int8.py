"""ONNX Runtime CPU per-call latency: fp32 vs int8 (dynamic) vs int8 (Q/DQ) vs fp16, tiny and S.

    python benchmarks/bench_int8.py [--work DIR] [--repeats N] [--presets tiny,S] [--json out.json]

tiny: the shipped checkpoint, batch 2 (one guided call of one video). S: random weights (adaLN-Zero
perturbed so the output is not zero), exported once with fixed batch 1 and reused from --work.
Each graph is made by vdit_deploy.calibration from a small calibration set of the fp32 sampler;
eps rel L2 is measured on that set. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from common import random_checkpoint
from vdit_deploy.calibration.collect import load_calibration_set, onnx_session, run_onnx
from vdit_deploy.export.variants import DENOISER, FP16, FP32, INT8_DYNAMIC, INT8_QDQ, variant_file
from vdit_deploy.metrics import rel_l2

VARIANTS = (FP32, INT8_DYNAMIC, INT8_QDQ, FP16)   # rows in this order: fp32 first, the speed-up base


def s_export(work: Path) -> Path:
    from vdit_deploy.config import preset
    from vdit_deploy.export.onnx_export import export_checkpoint

    export = work / "S_export"
    if not (export / "denoiser.onnx").is_file():
        export_checkpoint(random_checkpoint(preset("S"), work / "S_ckpt"), export, fixed=1)
    return export


def tiny_export(work: Path) -> Path:
    from vdit_deploy.checkpoint import SHIPPED
    from vdit_deploy.export.onnx_export import export_checkpoint

    export = work / "tiny_export"
    if not (export / "denoiser.onnx").is_file():
        export_checkpoint(SHIPPED, export, batch=(1, 8))
    return export


def prepare(export: Path, calib: Path, small: bool) -> None:
    from vdit_deploy.calibration.collect import collect
    from vdit_deploy.calibration.fp16 import convert_fp16
    from vdit_deploy.calibration.int8 import quantize_int8

    if not (calib / "manifest.json").is_file():
        # S (fixed batch 1): unguided calls, few steps: enough rows for ranges, minutes not hours
        kw = dict(steps=10, guidance=1.0, seeds=range(1), labels=[0], timesteps=4) if small else \
            dict(steps=50, guidance=2.0, seeds=range(2), timesteps=8)
        collect(export, calib, **kw)
    convert_fp16(export, calib)
    quantize_int8(export, calib, mode="dynamic")
    quantize_int8(export, calib, mode="qdq")


def latency(path: Path, feed: dict, repeats: int, threads: int) -> dict:
    session = onnx_session(path, threads)
    for _ in range(2):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * float(np.min(times))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/vdit-bench-int8"))
    ap.add_argument("--presets", default="tiny,S")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (0: all cores)")
    ap.add_argument("--json", type=Path, default=Path("bench_int8.json"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.presets.split(","):
        export = tiny_export(args.work) if name == "tiny" else s_export(args.work)
        calib = args.work / f"{name}_calib"
        prepare(export, calib, small=name != "tiny")
        cset = load_calibration_set(calib)
        ref = run_onnx(export / "denoiser.onnx", cset)
        lo, hi = (1, 1) if name != "tiny" else (2, 2)
        feed = next(cset.batches(lo, hi))
        base = None
        for variant in VARIANTS:
            file = export / variant_file(DENOISER, variant)
            lat = latency(file, feed, args.repeats, args.threads)
            base = base or lat["median_ms"]
            err = rel_l2(run_onnx(file, cset), ref)
            rows.append({"preset": name, "variant": variant, "batch": len(feed["t"]), **lat,
                         "speedup_vs_fp32": base / lat["median_ms"], "eps_rel_l2": err})
            print(f"{name:<5} {variant:<13} batch {len(feed['t'])}  {lat['median_ms']:9.2f} ms  "
                  f"x{base / lat['median_ms']:.2f}  eps relL2 {err:.2e}", flush=True)
    print(f"\n{'preset':<6} {'variant':<13} {'batch':>5} {'median ms':>10} {'vs fp32':>8} {'eps relL2':>10}")
    for r in rows:
        print(f"{r['preset']:<6} {r['variant']:<13} {r['batch']:>5} {r['median_ms']:>10.2f} "
              f"{r['speedup_vs_fp32']:>7.2f}x {r['eps_rel_l2']:>10.2e}")
    import onnxruntime as ort
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "onnxruntime": ort.__version__},
           "threads": args.threads, "rows": rows}
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
