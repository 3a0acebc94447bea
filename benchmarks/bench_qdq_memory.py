"""Peak resident memory of `vdit calibrate int8 --mode qdq`, per preset, measured by /usr/bin/time -v.

    python benchmarks/bench_qdq_memory.py [--work DIR] [--presets tiny,S] [--threads 1] [--json out.json]

tiny: the shipped checkpoint, exported and collected with the README's commands (`vdit export`,
`vdit calibrate collect`: UniPC 15, guidance 2, 4 seeds x 4 labels, 8 timesteps: 32 calls of 8 rows).
S, B: random weights (benchmarks/common.random_checkpoint, as bench_int8.py), fixed batch 1, a set of
UniPC 10 steps, guidance 2, 1 seed, label 0, 4 timesteps (8 calibration batches of 1 row). Each measured
command runs in a fresh process; the baseline is that process's imports alone (python -c import ...).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from common import random_checkpoint

VDIT = [sys.executable, "-m", "vdit_deploy.cli"]


def timed(cmd: list[str], threads: int) -> dict:
    """Run cmd under /usr/bin/time -v; its peak RSS (MB) and wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", r.stderr).group(1)
    seconds = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    return {"peak_mb": rss / 1024, "wall_s": seconds, "stdout": r.stdout.strip().splitlines()[:2]}


def prepare(name: str, work: Path, threads: int) -> Path:
    export, calib = work / f"{name}_export", work / f"{name}_calib"
    t = ["--threads", str(threads)]
    if not (export / "denoiser.onnx").is_file():
        if name == "tiny":
            from vdit_deploy.checkpoint import SHIPPED

            timed([*VDIT, "export", str(SHIPPED), "--out", str(export), *t], threads)
        else:
            from vdit_deploy.config import preset

            ckpt = random_checkpoint(preset(name), work / f"{name}_ckpt")
            timed([*VDIT, "export", str(ckpt), "--out", str(export), "--fixed-batch", "1", "--no-verify", *t],
                  threads)
    if not (calib / "manifest.json").is_file():
        small = [] if name == "tiny" else ["--steps", "10", "--seeds", "1", "--label", "0", "--timesteps", "4"]
        timed([*VDIT, "calibrate", "collect", str(export), "--out", str(calib), *small, *t], threads)
    return export


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/vdit-bench-qdq-memory"))
    ap.add_argument("--presets", default="tiny,S")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=Path("bench_qdq_memory.json"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = timed([sys.executable, "-c", "import onnx, onnxruntime, onnxruntime.quantization, vdit_deploy.cli"],
                 args.threads)
    rows = [{"preset": "imports only", **base}]
    print(f"imports only: {base['peak_mb']:.0f} MB", flush=True)
    for name in args.presets.split(","):
        export = prepare(name, args.work, args.threads)
        weights = sum(f.stat().st_size for f in export.glob("denoiser.onnx*")) / 2 ** 20
        for f in export.glob("*int8-qdq.onnx"):
            f.unlink()
        r = timed([*VDIT, "calibrate", "int8", str(export), "--calib", str(args.work / f"{name}_calib"),
                   "--mode", "qdq", "--threads", str(args.threads)], args.threads)
        rows.append({"preset": name, "denoiser_mb": weights, **r})
        print(f"{name}: denoiser.onnx {weights:.1f} MB, peak {r['peak_mb']:.0f} MB, {r['wall_s']:.0f} s; "
              f"{r['stdout'][-1] if r['stdout'] else ''}", flush=True)
    args.json.write_text(json.dumps({"threads": args.threads, "loadavg": open("/proc/loadavg").read().split()[:3],
                                     "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
