"""Accuracy report: each low-precision graph against fp32 of the same export, with identical noise.

    vdit calibrate report EXPORT_DIR --out REPORT_DIR

The numbers are `vdit compare`'s (vdit_deploy.compare.measure), on ONNX Runtime CPU only, for every
precision (the graph ONNX Runtime loads for it: int8 is denoiser.int8-dynamic.onnx) and seed:
  - relative L2 of the denoiser output (eps, v or x0, and an eps+var model's variance) per timestep,
    on the fp32 trajectory's own inputs (teacher forcing: the per-call error, not compounded): a line
    per precision in eps_error.png;
  - the final videos of full independent trajectories (same seed, noise and conditioning): PSNR and
    SSIM, worst seed;
  - a GIF grid, one row per sample, one column per precision (fp32 | fp16 | int8 ...).
report.json holds all numbers. matplotlib is optional (pip install 'vdit-deploy[report]').
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vdit_deploy.compare.measure import accuracy, record_calls, teacher_forced
from vdit_deploy.compare.report import fmt, write_gif
from vdit_deploy.export.variants import FP16, FP32, INT8, INT8_DYNAMIC, INT8_QDQ
from vdit_deploy.files import atomic_path
from vdit_deploy.plots import plot_error_vs_timestep

PSNR_TARGETS = {FP16: 40.0, INT8_DYNAMIC: 30.0, INT8_QDQ: 30.0}   # dB against fp32 (issue 4), by graph


def accuracy_report(export_dir, precisions=(FP16, INT8), steps: int = 50, seeds=range(2), labels=None,
                    out_dir="calibration-report", sampler: str = "ddim", guidance: float = 2.0,
                    eta: float = 0.0, cond=None) -> dict:
    """labels (class models; default every class) or cond (a dict or .safetensors file): the videos of
    each sample, one per row."""
    from vdit_deploy.sampling import conditioning, sampler_plan
    from vdit_deploy.runtimes.ort_runtime import OrtRuntime
    from vdit_deploy.sampling import sample

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    ref = OrtRuntime(export_dir, FP32, providers=["cpu"])
    contract = ref.contract
    served = conditioning(contract, labels, cond)
    plan = sampler_plan(contract, sampler, None if sampler == "ddpm" else steps, eta)
    rts = {p: OrtRuntime(export_dir, p, providers=["cpu"]) for p in precisions}
    seeds = [int(s) for s in seeds]
    recorded = {seed: record_calls(ref.denoise, contract, served, plan, guidance, seed, ref.null) for seed in seeds}
    videos = {FP32: {seed: video for seed, (video, _, _) in recorded.items()}}
    results = {}
    for p, rt in rts.items():
        # host step (plain denoise) for every precision: the same update as the fp32 trajectory
        videos[p] = {seed: sample(rt.denoise, contract, served, plan, guidance, seed, null=rt.null) for seed in seeds}
        eps_err = [teacher_forced(rt.denoise_rows, recorded[seed][1])[0] for seed in seeds]
        acc = accuracy(videos[p], videos[FP32], eps_err, seeds)
        target = PSNR_TARGETS.get(rt.precision)   # the loaded graph's: int8 is int8-dynamic
        results[p] = {"file": rt.files[0].name, **acc, "target_psnr_db": target,
                      "meets_target": acc["finite"] and (target is None or acc["psnr_db"] is None
                                                         or acc["psnr_db"] >= target)}
    report = {"export": str(export_dir), "sampler": sampler, "steps": len(plan), "guidance": guidance, "eta": eta,
              "seeds": seeds, "conditioning": describe_served(contract, served, cond),
              "timesteps": [s.t for s in plan], "results": results,
              "files": {"json": "report.json"}, "notes": []}
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        report["files"]["plot"] = plot_eps_error(report, out_dir / "eps_error.png").name
    except ImportError:
        report["notes"].append("plot skipped: matplotlib is not installed (pip install 'vdit-deploy[report]')")
    columns = {c: np.concatenate([videos[c][seed] for seed in seeds]) for c in (FP32, *precisions)}
    if gif := write_gif(out_dir / "samples.gif", columns, report["notes"]):   # one row per (seed, video)
        report["files"]["gif"], report["files"]["gif_columns"] = gif, list(columns)
    with atomic_path(out_dir / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    return report


def video_psnr(export_dir, precisions, seeds=(0,), sampler: str | None = None, steps: int | None = None,
               guidance: float = 2.0, labels=None) -> dict:
    """Worst-seed PSNR (dB) of each precision's final videos against fp32 of the same export: full
    independent trajectories, same noise and conditioning (every class by default), on ONNX Runtime CPU.
    sampler None: the model's default (UniPC, 15 steps, for a DDPM model). Torch-free: the CI guard
    (tests/test_int8_guard.py) and its emulated-CPU check (benchmarks/int8_haswell.sh) run it."""
    from vdit_deploy.metrics import psnr
    from vdit_deploy.runtimes.ort_runtime import OrtRuntime
    from vdit_deploy.sampling import conditioning, sample, sampler_plan

    def videos(precision):
        with OrtRuntime(export_dir, precision, providers=["cpu"]) as rt:
            served = conditioning(rt.contract, labels)
            plan = sampler_plan(rt.contract, sampler, steps)
            return [sample(rt.denoise, rt.contract, served, plan, guidance, seed, null=rt.null) for seed in seeds]

    ref = videos(FP32)
    return {p: min(psnr(got, want) for got, want in zip(videos(p), ref)) for p in precisions}


def describe_served(contract, served: dict, cond) -> str:
    """What the videos were conditioned on, for the report: the labels, or the file and its rows."""
    spec = contract.label_input()
    if spec is not None and cond is None:
        return f"labels {served[spec.name].tolist()}"
    where = cond if isinstance(cond, (str, Path)) else "the given conditioning"
    return f"{contract.batch_of(served)} row(s) of {where}"


def plot_eps_error(report: dict, path: Path) -> Path:
    curves = [(f"{p}: {fmt(r['psnr_db'], '.1f')} dB", report["timesteps"], r["eps_rel_l2_per_step"])
              for p, r in report["results"].items()]
    return plot_error_vs_timestep(curves, path, "eps relative L2 vs fp32")


def summary(report: dict) -> str:
    lines = [f"{'precision':<10} {'file':<24} {'PSNR dB':>8} {'SSIM':>7} {'eps relL2':>10}  target"]
    for p, r in report["results"].items():
        target = "" if r["target_psnr_db"] is None else (
            f">= {r['target_psnr_db']:g} dB {'ok' if r['meets_target'] else 'MISSED'}")
        lines.append(f"{p:<10} {r['file']:<24} {fmt(r['psnr_db'], '.2f'):>8} {fmt(r['ssim'], '.4f'):>7} "
                     f"{r['eps_rel_l2_mean']:>10.3e}  {target}")
    lines.append(f"{report['steps']} {report['sampler']} steps, guidance {report['guidance']}, "
                 f"seeds {report['seeds']}, {report['conditioning']}")
    return "\n".join(lines)
