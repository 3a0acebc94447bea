"""CPU fp32: PyTorch eager vs ONNX Runtime, against this machine's measured GEMM rate.

Times one denoiser call and a full DDIM sample (guidance 2: each step is a 2B batch) for each preset
and batch, all in one process, median of repeated runs; FLOPs come from ModelConfig.flops(). Weights
are random (adaLN-Zero perturbed so every block computes something): speed does not depend on them.

    python benchmarks/bench_cpu.py                       # tiny and S, batch 1 and 4 (long on 2 cores)
    python benchmarks/bench_cpu.py --quick               # tiny fully, S denoiser calls at batch 1
    python benchmarks/bench_cpu.py --presets tiny --sample-steps 50 --out bench.json

Targets (issue 3): ORT fp32 >= PyTorch eager speed, >= 80% of the GEMM rate on S, sampler overhead
outside the model < 2% of a sample.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

if "--threads" in sys.argv:   # BLAS reads its thread count at import: set it before numpy loads
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = sys.argv[sys.argv.index("--threads") + 1]

import numpy as np
import torch

from common import median_seconds, random_checkpoint
from vdit_deploy.config import preset
from vdit_deploy.schedules import Schedule
from vdit_deploy.samplers import make_steps
from vdit_deploy.export.metadata import read_metadata
from vdit_deploy.export.onnx_export import export_checkpoint
from vdit_deploy.runtimes.ort_runtime import OrtRuntime
from vdit_deploy.runtimes.torch_runtime import TorchRuntime
from vdit_deploy.sampling import SampleTimes, sample


def gemm_rate(n: int = 2048, repeats: int = 5) -> dict:
    """fp32 GFLOP/s of one large square matmul, numpy (BLAS) and torch; the higher is the machine's rate."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    flops = 2 * n ** 3
    rates = {"numpy": flops / median_seconds(lambda: a @ b, repeats) / 1e9}
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    rates["torch"] = flops / median_seconds(lambda: torch.matmul(ta, tb), repeats) / 1e9
    rates["best"] = max(rates.values())
    return rates


def bench_preset(name, batches, sample_batches, repeats, sample_steps, root, gemm, log, threads=None):
    ckpt = random_checkpoint(preset(name), root / name)
    start = time.perf_counter()
    export_checkpoint(ckpt, root / f"{name}-onnx", batch=(1, max(2, *batches, *sample_batches)))
    log(f"[{name}] exported in {time.perf_counter() - start:.1f} s")
    runtimes = {"torch-eager": TorchRuntime(ckpt, device="cpu"), "ort-cpu": OrtRuntime(root / f"{name}-onnx", threads=threads)}
    contract = runtimes["ort-cpu"].contract
    cfg = read_metadata(root / f"{name}-onnx" / "denoiser.onnx").config     # the built-in model's: FLOPs
    classes = contract.label_input().classes
    rows = []
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal((b, *contract.latent), dtype=np.float32)
        t, y = np.full(b, 500, np.float32), contract.labels(np.arange(b) % classes)
        for rt_name, rt in runtimes.items():
            sec = median_seconds(lambda: rt.denoise(x, t, y), repeats)
            gflops = cfg.flops(b) / sec / 1e9
            rows.append(dict(preset=name, runtime=rt_name, what="denoiser call", batch=b, seconds=sec,
                             gflops=gflops, gemm_fraction=gflops / gemm["best"]))
            log(f"[{name}] {rt_name:<11} denoiser b={b}: {sec * 1e3:8.1f} ms  {gflops:7.1f} GFLOP/s "
                f"({100 * gflops / gemm['best']:.0f}% of GEMM)")
    plan = make_steps(Schedule(), "ddim", sample_steps)
    for b in sample_batches:
        labels = list(np.arange(b) % classes)
        for rt_name, rt in runtimes.items():
            runs = []
            for _ in range(max(1, repeats // 2)):
                times = SampleTimes()
                sample(rt, contract, labels, plan, guidance=2.0, seed=0, times=times)
                runs.append(times)
            times = sorted(runs, key=lambda r: r.total)[len(runs) // 2]
            flops = sample_steps * cfg.flops(2 * b)              # guidance: cond + null, 2B per step
            rows.append(dict(preset=name, runtime=rt_name, what=f"{sample_steps}-step DDIM sample", batch=b,
                             seconds=times.total, gflops=flops / times.total / 1e9,
                             gemm_fraction=flops / times.total / 1e9 / gemm["best"],
                             overhead_fraction=times.overhead / times.total))
            log(f"[{name}] {rt_name:<11} sample b={b}: {times.total:8.2f} s  "
                f"overhead {100 * times.overhead / times.total:.2f}%")
    for rt in runtimes.values():
        rt.close()
    return rows


def table(rows, gemm) -> str:
    lines = [f"fp32 GEMM rate: {gemm['best']:.1f} GFLOP/s (numpy {gemm['numpy']:.1f}, torch {gemm['torch']:.1f})",
             f"{'preset':<6} {'runtime':<12} {'what':<22} {'batch':>5} {'time':>10} {'GFLOP/s':>8} "
             f"{'% GEMM':>7} {'overhead':>9}"]
    for r in rows:
        over = f"{100 * r['overhead_fraction']:.2f}%" if "overhead_fraction" in r else ""
        tm = f"{r['seconds'] * 1e3:.1f} ms" if r["seconds"] < 10 else f"{r['seconds']:.1f} s"
        lines.append(f"{r['preset']:<6} {r['runtime']:<12} {r['what']:<22} {r['batch']:>5} {tm:>10} "
                     f"{r['gflops']:>8.1f} {100 * r['gemm_fraction']:>6.0f}% {over:>9}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,S", help="Comma-separated presets.")
    ap.add_argument("--batches", default="1,4", help="Denoiser-call batch sizes.")
    ap.add_argument("--sample-batches", default=None, help="Sample batch sizes (default: --batches).")
    ap.add_argument("--sample-presets", default=None, help="Presets to run full samples for (default: all).")
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true",
                    help="tiny: everything; S: denoiser calls at batch 1 only; 3 repeats.")
    ap.add_argument("--threads", type=int, default=None,
                    help="Threads for torch, ONNX Runtime and BLAS alike (default: each library's own).")
    ap.add_argument("--out", default="bench_cpu.json")
    args = ap.parse_args(argv)
    presets = args.presets.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    sample_batches = [int(b) for b in (args.sample_batches or args.batches).split(",")]
    sample_presets = set(args.sample_presets.split(",")) if args.sample_presets else set(presets)
    repeats = 3 if args.quick else args.repeats
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    gemm = gemm_rate()
    log(f"fp32 GEMM: {gemm}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in presets:
            quick_big = args.quick and name != "tiny"
            rows += bench_preset(name, [1] if quick_big else batches,
                                 [] if quick_big or name not in sample_presets else sample_batches,
                                 repeats, args.sample_steps, Path(tmp), gemm, log, args.threads)
    gemm_after = gemm_rate()    # the machine is shared: bracket the run
    print(table(rows, gemm))
    print(f"GEMM rate after the run: {gemm_after['best']:.1f} GFLOP/s (the machine may be shared)")
    result = {"gemm_gflops": gemm, "gemm_gflops_after": gemm_after, "rows": rows,
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform(), "torch": torch.__version__,
                          "onnxruntime": __import__("onnxruntime").__version__},
              "args": vars(args)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
