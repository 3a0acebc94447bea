"""The default thread count (vdit_deploy/threads.py: cores minus the 1-minute load) against 1 and 2
threads, with and without an artificial background load.

    python benchmarks/bench_threads.py [--busy 0,2] [--repeats 3] [--out benchmarks/cpu/threads-DATE.json]

For each background load (N busy-loop processes, each bounded: it exits by itself after --hold
seconds, and is killed at the end anyway) it waits --settle seconds so the load average sees it, then
runs `vdit sample` (the shipped checkpoint, UniPC 15 steps, one video) with PyTorch and with ONNX
Runtime (an export of the same checkpoint), each with --threads 1, --threads 2 and no --threads (the
default, which the child picks from the load it sees), and records the sampling time that
`vdit sample` prints and the count the default chose. The machine's own load (other users) is
recorded with each row: it is part of the conditions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

BUSY = "import time\nend = time.time() + {hold}\nwhile time.time() < end:\n    pass\n"


def run_sample(args: list[str], out: Path, threads: int | None) -> tuple[float, int]:
    """One `vdit sample` in a fresh process -> (sampling seconds it reports, threads it used)."""
    cmd = [sys.executable, "-m", "vdit_deploy.cli", "sample", *args, "--out", str(out)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    m = re.search(r"in ([0-9.]+) s \(.*, (\d+) CPU thread", proc.stdout)
    return float(m.group(1)), int(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", default="0,2", help="background busy-loop processes, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settle", type=float, default=75.0, help="seconds for the load average to see the loops")
    ap.add_argument("--hold", type=float, default=900.0, help="each busy loop's own time limit, seconds")
    ap.add_argument("--out", type=Path, default=Path(f"benchmarks/cpu/threads-{date.today()}.json"))
    args = ap.parse_args()

    import onnx
    import onnxruntime
    import torch

    from vdit_deploy.checkpoint import SHIPPED
    from vdit_deploy.export.onnx_export import export_checkpoint
    from vdit_deploy.threads import cores, load

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_checkpoint(SHIPPED, tmp / "onnx", batch=(1, 2))
        workloads = {"torch": ["--checkpoint", str(SHIPPED)], "ort": ["--runtime", "ort", "--onnx", str(tmp / "onnx")]}
        for busy in (int(b) for b in args.busy.split(",")):
            loops = [subprocess.Popen([sys.executable, "-c", BUSY.format(hold=args.hold)]) for _ in range(busy)]
            try:
                if busy:
                    time.sleep(args.settle)
                for name, wargs in workloads.items():
                    for threads in (1, 2, None):
                        before = load()
                        runs = [run_sample(wargs + ["--label", "0"], tmp / "v.npy", threads)
                                for _ in range(args.repeats)]
                        rows.append({"runtime": name, "busy_loops": busy, "threads": threads or "default",
                                     "threads_used": sorted({t for _, t in runs}),
                                     "median_s": statistics.median(s for s, _ in runs),
                                     "runs_s": [s for s, _ in runs], "load_before": before, "load_after": load()})
                        print(json.dumps(rows[-1]), flush=True)
            finally:
                for p in loops:
                    p.kill()
                    p.wait()
    result = {"what": "vdit sample, shipped checkpoint, UniPC 15 steps, 1 video, guidance 2; seconds of sampling "
                      "(vdit's own timer), median of repeats; default = vdit_deploy.threads.default_threads()",
              "date": str(date.today()), "cores": cores(), "cpu": platform.processor() or platform.machine(),
              "isa": sorted(set(re.findall(r"avx512_vnni|avx2", Path("/proc/cpuinfo").read_text())))
              if Path("/proc/cpuinfo").is_file() else [],
              "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                           "python": platform.python_version()},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"| runtime | background loops | --threads | used | median s | runs s | load (1 min) |")
    print("|---|---:|---|---|---:|---|---|")
    for r in rows:
        print(f"| {r['runtime']} | {r['busy_loops']} | {r['threads']} | {','.join(map(str, r['threads_used']))} | "
              f"{r['median_s']:.2f} | {', '.join(f'{s:.2f}' for s in r['runs_s'])} | "
              f"{r['load_before']:.1f}-{r['load_after']:.1f} |")


if __name__ == "__main__":
    main()
