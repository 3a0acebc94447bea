"""Accuracy report: each low-precision graph against fp32 of the same export, with identical noise.

    vdit calibrate report EXPORT_DIR --out REPORT_DIR

For every precision (denoiser.<precision>.onnx) and seed:
  - eps relative L2 per timestep, on the fp32 trajectory's own inputs (the per-call error, not
    compounded): a line per precision in eps_error.png;
  - the final videos of full independent trajectories (same seed, same noise): PSNR and SSIM;
  - a GIF grid, one row per sample, one column per precision (fp32 | fp16 | int8 ...).
report.json holds all numbers. matplotlib is optional (pip install 'vdit-deploy[report]').
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.files import atomic_path
from vdit_deploy.plots import plot_error_vs_timestep

PSNR_TARGETS = {"fp16": 40.0, "int8": 30.0, "int8-qdq": 30.0}   # dB against fp32 (issue 4)


def accuracy_report(export_dir, precisions=("fp16", "int8"), steps: int = 50, seeds=range(2), labels=None,
                    out_dir="calibration-report", sampler: str = "ddim", guidance: float = 2.0,
                    eta: float = 0.0) -> dict:
    from vdit_deploy.diffusion import make_steps
    from vdit_deploy.metrics import psnr, rel_l2, ssim
    from vdit_deploy.runtimes.ort_runtime import OrtRuntime
    from vdit_deploy.sampling import check_labels, sample

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    ref = OrtRuntime(export_dir, "fp32", providers=["cpu"])
    cfg = ref.config
    y = check_labels(range(cfg.num_classes) if labels is None else labels, cfg)
    plan = make_steps(ref.schedule, sampler, None if sampler == "ddpm" else steps, eta)
    rts = {p: OrtRuntime(export_dir, p, providers=["cpu"]) for p in precisions}
    seeds = [int(s) for s in seeds]
    eps_err = {p: np.zeros((len(seeds), len(plan))) for p in precisions}
    videos = {p: [] for p in ("fp32", *precisions)}
    for i, seed in enumerate(seeds):
        k = iter(range(len(plan)))

        def fp32_and_probe(x, t, yy):   # fp32 trajectory; each precision evaluated on the same inputs
            eps = ref.denoise(x, t, yy)
            j = next(k)
            for p, rt in rts.items():
                eps_err[p][i, j] = rel_l2(rt.denoise(x, t, yy), eps)
            return eps

        videos["fp32"].append(sample(fp32_and_probe, cfg, y, plan, guidance, seed))
        for p, rt in rts.items():
            videos[p].append(sample(rt.denoise, cfg, y, plan, guidance, seed))   # host step: same update as fp32
    ref_v = np.concatenate(videos["fp32"])
    results = {}
    for p in precisions:
        got = np.concatenate(videos[p])
        finite = bool(np.isfinite(got).all())
        results[p] = {
            "file": rts[p].graph.path.name,
            "psnr_db": psnr(got, ref_v) if finite else float("nan"),
            "psnr_db_per_video": [psnr(g, r) for g, r in zip(got, ref_v)],
            "ssim": ssim(got, ref_v) if finite else float("nan"),
            "finite": finite,
            "eps_rel_l2_mean": float(eps_err[p].mean()),
            "eps_rel_l2_per_step": eps_err[p].mean(axis=0).tolist(),
            "target_psnr_db": PSNR_TARGETS.get(p),
        }
        results[p]["meets_target"] = (results[p]["target_psnr_db"] is None
                                      or results[p]["psnr_db"] >= results[p]["target_psnr_db"])
    report = {"export": str(export_dir), "sampler": sampler, "steps": len(plan), "guidance": guidance, "eta": eta,
              "seeds": seeds, "labels": y.tolist(), "timesteps": [s.t for s in plan], "results": results,
              "files": {"json": "report.json"}, "notes": []}
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        report["files"]["plot"] = plot_eps_error(report, out_dir / "eps_error.png").name
    except ImportError:
        report["notes"].append("plot skipped: matplotlib is not installed (pip install 'vdit-deploy[report]')")
    try:
        from vdit_deploy.video import write_video

        columns = ["fp32", *precisions]
        grid = np.stack([np.concatenate(videos[c]) for c in columns], axis=1)   # (samples, cols, ...)
        grid = grid.reshape(-1, *grid.shape[2:])                    # (samples * columns, C, F, H, W)
        write_video(out_dir / "samples.gif", grid, columns=len(columns))
        report["files"]["gif"], report["files"]["gif_columns"] = "samples.gif", columns
    except VditError as e:
        report["notes"].append(f"GIF skipped: {e}")
    with atomic_path(out_dir / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    return report


def plot_eps_error(report: dict, path: Path) -> Path:
    curves = [(f"{p}: {r['psnr_db']:.1f} dB", report["timesteps"], r["eps_rel_l2_per_step"])
              for p, r in report["results"].items()]
    return plot_error_vs_timestep(curves, path, "eps relative L2 vs fp32")


def summary(report: dict) -> str:
    lines = [f"{'precision':<10} {'file':<24} {'PSNR dB':>8} {'SSIM':>7} {'eps relL2':>10}  target"]
    for p, r in report["results"].items():
        target = "" if r["target_psnr_db"] is None else (
            f">= {r['target_psnr_db']:g} dB {'ok' if r['meets_target'] else 'MISSED'}")
        lines.append(f"{p:<10} {r['file']:<24} {r['psnr_db']:>8.2f} {r['ssim']:>7.4f} {r['eps_rel_l2_mean']:>10.3e}  {target}")
    lines.append(f"{report['steps']} {report['sampler']} steps, guidance {report['guidance']}, "
                 f"seeds {report['seeds']}, labels {report['labels']}")
    return "\n".join(lines)
