"""ONNX Runtime CPU per-call latency: fp32 vs int8 (dynamic) vs int8 (Q/DQ) vs fp16, tiny and S.

    python benchmarks/bench_int8.py [--work DIR] [--repeats N] [--presets tiny,S] [--json out.json]

tiny: the shipped checkpoint, batch 2 (one guided call of one video). S: random weights (adaLN-Zero
perturbed so the output is not zero), exported once with fixed batch 1 and reused from --work.
S also times the same call in PyTorch, torch.compile (inductor, default mode) of the fp32 model, with
torch's threads set to --threads: the `torch.compile` row, the base of `vs compile`.
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


def compile_latency(ckpt: Path, feed: dict, repeats: int, threads: int) -> dict:
    """torch.compile (inductor) of the fp32 denoiser, per call on the same feed; compile time apart."""
    import torch

    from vdit_deploy.checkpoint import load_model

    torch.set_num_threads(threads or torch.get_num_threads())
    model = load_model(ckpt)[0].eval()
    fn = torch.compile(model, dynamic=False)
    args = [torch.from_numpy(feed[k]) for k in ("x_t", "t", "y")]
    with torch.inference_mode():
        t0 = time.perf_counter()
        fn(*args)
        compile_s = time.perf_counter() - t0
        fn(*args)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * float(np.min(times)),
            "compile_s": compile_s}


def machine() -> dict:
    import os

    import onnx
    import onnxruntime as ort
    import torch

    from vdit_deploy.runtimes.cpu_isa import _cpuinfo_flags, host_isa

    flags = sorted(_cpuinfo_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})
    return {"cpu": platform.processor() or platform.machine(), "int8_isa": host_isa(), "flags": flags,
            "loadavg_before": os.getloadavg(), "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "torch": torch.__version__, "numpy": np.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


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
    facts = machine()
    print(facts, flush=True)
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
        if name != "tiny":
            lat = compile_latency(args.work / "S_ckpt", feed, args.repeats, args.threads)
            rows.append({"preset": name, "variant": "torch.compile", "batch": len(feed["t"]), **lat,
                         "speedup_vs_fp32": base / lat["median_ms"], "eps_rel_l2": None})
            print(f"{name:<5} torch.compile  batch {len(feed['t'])}  {lat['median_ms']:9.2f} ms  "
                  f"(compiled in {lat['compile_s']:.0f} s)", flush=True)
            compiled = lat["median_ms"]
            for r in rows:
                if r["preset"] == name:
                    r["speedup_vs_compile"] = compiled / r["median_ms"]
    print(f"\n{'preset':<6} {'variant':<13} {'batch':>5} {'median ms':>10} {'vs fp32':>8} {'vs compile':>10} "
          f"{'eps relL2':>10}")
    for r in rows:
        vs = f"{r['speedup_vs_compile']:.2f}x" if "speedup_vs_compile" in r else ""
        err = "" if r["eps_rel_l2"] is None else f"{r['eps_rel_l2']:.2e}"
        print(f"{r['preset']:<6} {r['variant']:<13} {r['batch']:>5} {r['median_ms']:>10.2f} "
              f"{r['speedup_vs_fp32']:>7.2f}x {vs:>10} {err:>10}")
    import os
    facts["loadavg_after"] = os.getloadavg()
    print(facts)
    out = {"machine": facts, "threads": args.threads, "rows": rows}
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
