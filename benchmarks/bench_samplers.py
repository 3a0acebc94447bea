"""Quality per step: DDIM, DPM-Solver++(2M) and UniPC-bh2 against a 250-step DDIM reference.

On the shipped checkpoint (PyTorch fp32, CPU), for every sampler and step count: the final videos'
PSNR / SSIM against 250-step DDIM from the same x_T and labels (seeds x one video per class, guidance
2, the samplers' defaults otherwise), and the wall time of a sample (the fastest of the seeds' runs). The solvers run from each
--lambda-mins start (-inf: t=999 as diffusers' defaults; the default LAMBDA_MIN). On S (random weights:
speed does not depend on them) only the time: a few guided steps of each sampler are timed and the
per-step median is multiplied by the step count (a sample is N identical denoiser calls plus the host
update).

    python benchmarks/bench_samplers.py --seeds 2,3          # the README table (seeds held out from the sweep)
    python benchmarks/bench_samplers.py --seeds 0,1 --steps 10,15,20 --lambda-mins=-inf,-5.1,-4.5,-4,-3.5,-3 \
        --no-s --out sweep.json --plot sweep.png              # the sweep that chose LAMBDA_MIN

Flow section (--flow CHECKPOINT, the flow-matching tiny model trained here: vdit_deploy/assets/tiny-flow):
flow euler, UniPC-flow and DPM-Solver++-flow (flow_samplers.py, as diffusers' schedulers) at 8/12/20/30
steps against a 200-step flow euler reference of the same x_T and labels (guidance 2, the model's shift).

    python benchmarks/bench_samplers.py --flow vdit_deploy/assets/tiny-flow --seeds 2,3 --out bench_flow.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from vdit_deploy.checkpoint import SHIPPED
from vdit_deploy.compare import machine_info
from vdit_deploy.schedules import LAMBDA_MIN
from vdit_deploy.samplers import SolverState, make_steps
from vdit_deploy.metrics import psnr, ssim
from vdit_deploy.plots import pyplot, save
from vdit_deploy.runtimes import open_runtime
from vdit_deploy.sampling import SampleTimes, sample

SAMPLERS = ("ddim", "dpm++", "unipc")
FLOW_SAMPLERS = ("euler", "unipc", "dpm++")
REFERENCE_STEPS = 250
FLOW_REFERENCE_STEPS = 200
GUIDANCE = 2.0


def score(rt, labels, plan, refs: dict) -> tuple[list, list, list]:
    """Each seed's sample with `plan` against its reference: per-video PSNR and SSIM, the wall times."""
    psnrs, ssims, totals = [], [], []
    for s, ref in refs.items():
        times = SampleTimes()
        videos = sample(rt, rt.contract, labels, plan, GUIDANCE, s, times=times)
        totals.append(times.total)
        psnrs += [psnr(v, r) for v, r in zip(videos, ref)]
        ssims += [ssim(v, r) for v, r in zip(videos, ref)]
    return psnrs, ssims, totals


def quality(steps_list, seeds, lambda_mins, log) -> dict:
    with open_runtime("torch", SHIPPED, device="cpu") as rt:
        contract = rt.contract
        labels = list(range(contract.label_input().classes))
        log(f"reference: {REFERENCE_STEPS}-step DDIM, seeds {seeds}, labels {labels}")
        refs = {s: sample(rt, contract, labels, make_steps(rt.schedule, "ddim", REFERENCE_STEPS), GUIDANCE, s)
                for s in seeds}
        rows = []
        configs = [("ddim", None)] + [(s, lm) for s in SAMPLERS[1:] for lm in lambda_mins]
        for sampler, lambda_min in configs:
            for n in steps_list:
                plan = make_steps(rt.schedule, sampler, n, **({} if lambda_min is None else {"lambda_min": lambda_min}))
                psnrs, ssims, totals = score(rt, labels, plan, refs)
                rows.append({"sampler": sampler, "lambda_min": None if lambda_min is None else f"{lambda_min:g}",
                             "first_t": plan[0].t, "steps": n,
                             "psnr_db": float(np.mean(psnrs)),
                             "psnr_min_db": float(np.min(psnrs)), "ssim": float(np.mean(ssims)),
                             "sample_s": min(totals), "videos_per_sample": len(labels),
                             "load_1m": os.getloadavg()[0]})   # the machine is shared: min over seeds, load noted
                log(f"  {label(rows[-1]):<16} {n:>3} steps: PSNR {rows[-1]['psnr_db']:.2f} dB (min {rows[-1]['psnr_min_db']:.2f}), "
                    f"SSIM {rows[-1]['ssim']:.4f}, {rows[-1]['sample_s']:.2f} s")
    return {"checkpoint": str(SHIPPED), "runtime": "torch:fp32 cpu", "guidance": GUIDANCE, "seeds": list(seeds),
            "labels": labels, "reference": f"ddim {REFERENCE_STEPS} steps", "rows": rows}


def s_timing(steps_list, timed_steps: int, log) -> dict:
    """Per-step time of each sampler on S (random weights, batch 1, guided), extrapolated to N steps."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_cpu import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp, open_runtime("torch", random_checkpoint("S", Path(tmp)), device="cpu") as rt:
        x = np.random.default_rng(0).standard_normal((1, *rt.contract.latent), dtype=np.float32)
        y, zeros = rt.contract.labels([0]), np.zeros_like(x)
        per_step = {}
        for sampler in SAMPLERS:
            plan, state = make_steps(rt.schedule, sampler, 20), SolverState()
            rt.step(x, plan[0].t, y, GUIDANCE, plan[0].coefs, zeros, state)   # warm-up
            times = []
            for step in plan[1:1 + timed_steps]:
                start = time.perf_counter()
                rt.step(x, step.t, y, GUIDANCE, step.coefs, zeros, state)
                times.append(time.perf_counter() - start)
            per_step[sampler] = statistics.median(times)
            log(f"  S {sampler:<6}: {per_step[sampler] * 1e3:.0f} ms per guided step (median of {timed_steps})")
    return {"preset": "S", "weights": "random", "runtime": "torch:fp32 cpu", "batch": 1, "guidance": GUIDANCE,
            "timed_steps": timed_steps, "step_s": per_step,
            "sample_s": {s: {n: per_step[s] * n for n in steps_list} for s in SAMPLERS},
            "method": f"median of {timed_steps} timed guided steps x N (extrapolated, not a full sample)"}


def flow_quality(checkpoint, steps_list, seeds, log) -> dict:
    """PSNR / SSIM of each flow sampler's final videos against 200-step flow euler (same x_T, labels)."""
    from vdit_deploy.flow_samplers import flow_steps

    with open_runtime("torch", checkpoint, device="cpu") as rt:
        contract = rt.contract
        if contract.schedule.kind != "flow":
            raise SystemExit(f"{checkpoint} is not a flow-matching checkpoint")
        labels = list(range(contract.label_input().classes))
        log(f"flow reference: {FLOW_REFERENCE_STEPS}-step flow euler, seeds {seeds}, labels {labels}")
        ref_plan = flow_steps(contract.schedule, "euler", FLOW_REFERENCE_STEPS)
        refs = {s: sample(rt, contract, labels, ref_plan, GUIDANCE, s) for s in seeds}
        # how distinct the classes are: the reference videos' mean PSNR between different labels
        between = [psnr(refs[s][i], refs[s][j]) for s in seeds for i in labels for j in labels if i < j]
        rows = []
        for sampler in FLOW_SAMPLERS:
            for n in steps_list:
                plan = flow_steps(contract.schedule, sampler, n)
                psnrs, ssims, totals = score(rt, labels, plan, refs)
                rows.append({"sampler": sampler, "steps": n, "psnr_db": float(np.mean(psnrs)),
                             "psnr_min_db": float(np.min(psnrs)), "ssim": float(np.mean(ssims)),
                             "sample_s": min(totals)})
                log(f"  {sampler:6s} {n:3d} steps: {rows[-1]['psnr_db']:.1f} dB, SSIM {rows[-1]['ssim']:.4f}")
    return {"checkpoint": str(checkpoint), "schedule": contract.schedule.to_dict(), "seeds": seeds, "labels": labels,
            "guidance": GUIDANCE, "reference": f"{FLOW_REFERENCE_STEPS}-step flow euler",
            "between_class_psnr_db": float(np.mean(between)), "rows": rows}


def flow_table(result: dict) -> str:
    f = result["flow"]
    steps = sorted({r["steps"] for r in f["rows"]})
    lines = ["| steps | " + " | ".join(FLOW_SAMPLERS) + " |", "|---:|" + "---:|" * len(FLOW_SAMPLERS)]
    for n in steps:
        cells = [next(f"{r['psnr_db']:.1f} / {r['ssim']:.3f}" for r in f["rows"] if r["sampler"] == s and r["steps"] == n)
                 for s in FLOW_SAMPLERS]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nbetween classes (reference videos of different labels): {f['between_class_psnr_db']:.1f} dB"


def label(row: dict) -> str:
    lm = row["lambda_min"]
    return row["sampler"] if lm is None or lm == f"{LAMBDA_MIN:g}" else f"{row['sampler']} λ≥{lm}"


def table(result: dict) -> str:
    s = result.get("S")
    lines = ["| sampler | first t | steps | PSNR dB (mean / min) | SSIM | tiny s/sample | S s/sample (extrapolated) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["tiny"]["rows"]:
        s_time = f"{s['sample_s'][r['sampler']][r['steps']]:.1f}" if s else "-"
        lines.append(f"| {label(r)} | {r['first_t']} | {r['steps']} | {r['psnr_db']:.1f} / {r['psnr_min_db']:.1f} | "
                     f"{r['ssim']:.4f} | {r['sample_s']:.2f} | {s_time} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for name in dict.fromkeys(label(r) for r in result["tiny"]["rows"]):
        rows = [r for r in result["tiny"]["rows"] if label(r) == name]
        steps, style = [r["steps"] for r in rows], "--" if "λ" in name else "-"
        axes[0].plot(steps, [r["psnr_db"] for r in rows], style, marker="o", label=name)
        axes[1].plot(steps, [r["ssim"] for r in rows], style, marker="o", label=name)
    for ax, name in zip(axes, ("PSNR vs 250-step DDIM (dB)", "SSIM vs 250-step DDIM")):
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["steps"] for r in result["tiny"]["rows"]}))
        ax.set_xticklabels([str(t) for t in ax.get_xticks()])
        ax.minorticks_off()
        ax.set_xlabel("denoiser calls (steps)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    t = result["tiny"]
    fig.suptitle(f"shipped tiny checkpoint, guidance {t['guidance']:g}, seeds {t['seeds']} x {len(t['labels'])} classes",
                 fontsize=9)
    return save(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="5,10,15,20,25,50")
    ap.add_argument("--seeds", default="2,3", help="seeds (0,1 chose LAMBDA_MIN: report on others)")
    ap.add_argument("--lambda-mins", default=f"-inf,{LAMBDA_MIN:g}", help="solver starts (log alpha/sigma)")
    ap.add_argument("--timed-steps", type=int, default=3, help="S: guided steps timed per sampler")
    ap.add_argument("--no-s", action="store_true", help="skip the S timing")
    ap.add_argument("--flow", default=None, metavar="CHECKPOINT",
                    help="the flow section instead: flow samplers on this flow-matching checkpoint")
    ap.add_argument("--out", default="bench_samplers.json")
    ap.add_argument("--plot", default="docs/samplers.png")
    args = ap.parse_args(argv)
    steps_list = [int(s) for s in args.steps.split(",")]
    log = lambda m: print(m, file=sys.stderr, flush=True)
    started = time.perf_counter()
    if args.flow:
        steps = [int(s) for s in args.steps.split(",")] if args.steps != "5,10,15,20,25,50" else [8, 12, 20, 30]
        result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
                  "command": " ".join(["python", "benchmarks/bench_samplers.py", *(argv or sys.argv[1:])]),
                  "flow": flow_quality(args.flow, steps, [int(s) for s in args.seeds.split(",")], log)}
        result["seconds"] = time.perf_counter() - started
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(flow_table(result))
        print(f"wrote {args.out} ({result['seconds']:.0f} s)")
        return
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
              "command": " ".join(["python", "benchmarks/bench_samplers.py", *(argv or sys.argv[1:])]),
              "tiny": quality(steps_list, [int(s) for s in args.seeds.split(",")],
                              [float(v) for v in args.lambda_mins.split(",")], log)}
    if not args.no_s:
        result["S"] = s_timing(steps_list, args.timed_steps, log)
    result["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    plot(result, Path(args.plot))
    print(table(result))
    print(f"wrote {args.out}, {args.plot} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
