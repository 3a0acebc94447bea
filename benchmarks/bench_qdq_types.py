"""Q/DQ activation types and calibration methods on held-out videos (issue 25): which static INT8 graph
keeps the shipped checkpoint's videos closest to fp32 on this CPU.

    python benchmarks/bench_qdq_types.py --work DIR [--variants a,b] [--videos 16] [--threads 1] [--json out.json]

The shipped checkpoint, exported once, the default sampler (UniPC 15, guidance 2); PSNR of final videos
against ONNX Runtime fp32 with the same noise (calibration.report.video_psnr). Each variant is a Q/DQ
denoiser made by `calibration.int8.quantize_int8` with its options, evaluated two ways:
  heldout  calibrated on `vdit calibrate collect`'s set (seeds 0-3, every class, 8 timesteps); sampled
           on seeds 4-7 with every class in one sample: the worst video of each seed;
  compare  calibrated as `vdit compare` does (seeds 1000-1001); one video per seed, class seed % classes,
           seeds 0..--videos-1, as `vdit compare --batch 1` samples them: median, worst, seeds 0 and 1;
           the per-call eps relative L2 on the heldout set's rows (held out for this graph; through the
           runtime, so calls at the first steps' timesteps run in float where the graph says so) and the
           median ms of one guided call (batch 2) at the set's lowest timestep (an INT8 call).
One video's PSNR swings by several dB with small changes to a graph (the sampler amplifies a per-call
error unevenly), so the medians and the per-call error are the steadier figures. --threads fixes ONNX
Runtime's threads (float sums in another order change those swings too).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench_int8_plus import copy_export, machine, prepare
from common import median_seconds, write_report

# name -> quantize_int8 options; "before": the s8 symmetric percentile graph every CPU got until 2026-12-03,
# every step in INT8 as every variant here until the first steps went float by default (2026-12-04)
VARIANTS = {
    "before": dict(symmetric=True, method="percentile", float_steps=0),
    "symmetric-minmax": dict(symmetric=True),
    "asymmetric-percentile": dict(method="percentile"),
    "default": dict(),
    "all-int8": dict(float_steps=0),        # the default's graph with every step in INT8 (before 2026-12-04)
    "vnni": dict(target="vnni"),
    "tensorrt": dict(target="tensorrt"),
    "tensorrt-percentile": dict(target="tensorrt", method="percentile"),
    "bins3": dict(t_bins=3),
    "bins5": dict(t_bins=5),
    "smooth0.5": dict(smooth=0.5),
    "smooth0.8": dict(smooth=0.8),
    "dynamic": dict(mode="dynamic"),
    "dynamic-float2": dict(mode="dynamic", float_steps=2),
    # NVIDIA ModelOpt's ONNX PTQ (bench_int8_plus.modelopt_variant: its own calibration, TensorRT's Q/DQ
    # placement; needs `nvidia-modelopt` in a venv of its own, see bench_int8_plus.py). Not in the default list.
    "modelopt-int8": dict(modelopt="int8"),
}
DEFAULT_VARIANTS = [n for n in VARIANTS if not n.startswith("modelopt")]


def options_of(name: str) -> dict:
    """VARIANTS[name] as quantize_int8 keywords; symmetric=True: this CPU's choice with s8 symmetric
    activations (the types before the asymmetric CPU default)."""
    from dataclasses import replace

    from vdit_deploy.runtimes.cpu_isa import choose

    opts = {"mode": "qdq", **VARIANTS[name]}
    if "modelopt" in opts:
        return opts
    if opts.pop("symmetric", False):
        opts["target"] = replace(choose("qdq"), activation_type="int8", activation_symmetric=True)
    return opts


def make(export: Path, calib: Path, dest: Path, name: str) -> tuple[Path, str]:
    from vdit_deploy.calibration.int8 import quantize_int8

    if "modelopt" in VARIANTS[name]:
        from bench_int8_plus import modelopt_variant
        return modelopt_variant(export, calib, dest, VARIANTS[name]["modelopt"])[0], "int8-qdq"
    opts = options_of(name)
    precision = "int8" if opts["mode"] == "dynamic" else "int8-qdq"
    if not (dest / "made.json").is_file():
        copy_export(export, dest)
        start = time.perf_counter()
        quantize_int8(dest, calib, **opts)
        (dest / "made.json").write_text(json.dumps({"seconds": round(time.perf_counter() - start, 1)}))
    return dest, precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--videos", type=int, default=16, help="seeds of the compare-style evaluation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    names = [n for n in args.variants.split(",") if n]
    if unknown := [n for n in names if n not in VARIANTS]:
        raise SystemExit(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    from vdit_deploy.calibration.collect import collect, load_calibration_set
    from vdit_deploy.calibration.report import video_psnr
    from vdit_deploy.metrics import rel_l2
    from vdit_deploy.runtimes.ort_runtime import OrtRuntime
    from vdit_deploy.threads import configure

    configure(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    export, heldout_calib = prepare(args.work, 8)             # seeds 0-3, every class, 8 timesteps
    compare_calib = args.work / "calib-compare"
    if not (compare_calib / "manifest.json").is_file():
        collect(export, compare_calib, seeds=[1000, 1001], timesteps=8)
    rows = load_calibration_set(heldout_calib)

    def outputs(path, precision):       # every recorded call through the runtime (per-bin scales included)
        with OrtRuntime(path, precision, providers=["cpu"]) as rt:
            calls = [rows.rows(*r["rows"]) for r in rows.manifest["records"]]
            return np.concatenate([rt.denoise(f["x_t"], f["t"], {k: f[k] for k in rows.contract.names})
                                   for f in calls])

    ref_out = outputs(export, "fp32")
    classes = int(OrtRuntime(export, "fp32", providers=["cpu"]).contract.label_input().classes)
    report = {"machine": machine(), "threads": args.threads, "videos": args.videos,
              "command": f"python benchmarks/bench_qdq_types.py --variants {','.join(names)} --videos {args.videos} "
                         f"--threads {args.threads}", "variants": {}}
    for name in names:
        row = {"options": {k: str(v) for k, v in options_of(name).items()}}
        path, precision = make(export, heldout_calib, args.work / f"heldout-{name}", name)
        row["heldout_by_seed"] = {s: round(video_psnr(path, [precision], seeds=[s])[precision], 2) for s in (4, 5, 6, 7)}
        path, precision = make(export, compare_calib, args.work / f"compare-{name}", name)
        single = {s: round(video_psnr(path, [precision], seeds=[s], labels=[s % classes])[precision], 2)
                  for s in range(args.videos)}
        with OrtRuntime(path, precision, providers=["cpu"]) as rt:
            # timed at the set's lowest timestep: a call the INT8 graph runs (not one of the first steps in float)
            low = min(rows.manifest["records"], key=lambda r: r["t"])
            f = rows.rows(low["rows"][0], low["rows"][0] + 2)
            cond = {k: f[k] for k in rows.contract.names}
            ms = 1e3 * median_seconds(lambda: rt.denoise(f["x_t"], f["t"], cond), args.repeats)
        values = sorted(single.values())
        row.update(heldout_worst=min(row["heldout_by_seed"].values()), compare_by_seed=single,
                   compare_median=float(np.median(values)), compare_worst=values[0],
                   compare_seeds_0_1=[single.get(0), single.get(1)],
                   call_rel_l2=rel_l2(outputs(path, precision), ref_out), ms_per_call_b2=round(ms, 2))
        report["variants"][name] = row
        print(f"{name:<22} heldout worst {row['heldout_worst']:6.2f}  compare median {row['compare_median']:6.2f} "
              f"worst {row['compare_worst']:6.2f} seeds 0/1 {row['compare_seeds_0_1']}  call relL2 "
              f"{row['call_rel_l2']:.3e}  {ms:.2f} ms", flush=True)
        write_report(args.json, report)
    write_report(args.json, report, done=True)


if __name__ == "__main__":
    main()
