"""Bring your own video DiT, full size: the Latte-1 architecture (diffusers LatteTransformer3DModel:
28 spatial + 28 temporal blocks, 16 heads x 72, patch 2, 4 -> 8 channels (eps + learned variance),
caption width 4096; 1.35 B parameters, 5.4 GB in fp32) with random weights, as a user's
`save_pretrained` directory (sharded safetensors) beside a DDPM scheduler config, through the toolchain:

    export   `vdit export DIR --out OUT --no-verify` in a child process: seconds, peak RSS, file sizes
             (weights over 2 GB: external data)
    verify   export/verify.verify on a short trajectory (1 video, 2 DDIM steps, 1 replayed step): the
             denoiser and the fused step graph against PyTorch
    int8     dynamic INT8 (calibration/int8.quantize_int8): seconds, size, error against fp32
    time     seconds per denoiser call at batch 1 (16 x 32 x 32 latents, 120 text tokens): PyTorch fp32,
             ONNX Runtime fp32 and INT8, median of --repeats after a warm-up, in one run

Each stage writes its row into --json as it ends and is skipped when its row is there (rerun after an
interruption resumes). Random weights: the speed, memory and numerics of the size, not a model's videos.

    python benchmarks/bench_latte.py --work /tmp/latte1 --json benchmarks/cpu/latte1.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import time_calls, with_speedups

# Latte-1 (maxin-cn/Latte-1, transformer/config.json) at 256 px: sample_size 32 latents
LATTE1 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
              cross_attention_dim=1152, caption_channels=4096, attention_bias=True, sample_size=32, patch_size=2,
              video_length=16, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
              activation_fn="gelu-approximate")
TOKENS = 120


def make_model(path: Path) -> None:
    """Random Latte-1 weights saved as diffusers does (shards of 2 GB), with the DDPM scheduler config."""
    import diffusers
    import torch

    if (path / "config.json").is_file():
        return
    torch.manual_seed(0)
    model = diffusers.LatteTransformer3DModel(**LATTE1)
    with torch.no_grad():   # a freshly initialised DiT has zero output layers: open them
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(path, max_shard_size="2GB")
    diffusers.DDPMScheduler(variance_type="learned_range").save_pretrained(path)


def stage_export(model_dir: Path, out: Path) -> dict:
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-m", "vdit_deploy.cli", "export", str(model_dir), "--out", str(out),
                    "--no-verify"], check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(peak / 2 ** 20, 2),
            "peak_rss_note": "largest child so far" if peak == before else "the export process",
            "files_mb": {p.name: round(p.stat().st_size / 1e6, 1) for p in sorted(out.iterdir())}}


def stage_verify(out: Path) -> dict:
    from vdit_deploy.export.verify import verify

    start = time.perf_counter()
    report = verify(out, batches=(1,), num_steps=2, picks=1, polygraphy=False)
    return {"seconds": round(time.perf_counter() - start, 1), "ok": report.ok,
            "rows": [{"graph": r.graph, "output": r.output, "calls": r.calls, "rel_l2": r.rel_l2, "error": r.error,
                      "max_abs": r.max_abs, "tolerance": r.tolerance} for r in report.rows]}


def stage_int8(out: Path) -> dict:
    from vdit_deploy.calibration.int8 import quantize_int8

    start = time.perf_counter()
    path = quantize_int8(out, mode="dynamic")
    size = sum(p.stat().st_size for p in out.glob(path.name + "*"))
    return {"seconds": round(time.perf_counter() - start, 1), "file": path.name, "mb": round(size / 1e6, 1)}


def inputs(contract, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, *contract.latent), dtype=np.float32)
    cond = contract.example_cond(1, rng, {"seq": TOKENS})
    return x, np.array([500.0], np.float32), cond


def stage_time(model_dir: Path, out: Path, repeats: int) -> dict:
    """Each runtime timed, then closed, before the next is opened (24 GB: one 5.4 GB model at a time)."""
    import gc

    from vdit_deploy.runtimes import open_runtime

    rows, ref = {}, None
    for name, runtime, artifact, precision in (("torch fp32", "torch", model_dir, "fp32"),
                                               ("ort fp32", "ort", out, "fp32"),
                                               ("ort int8-dynamic", "ort", out, "int8")):
        options = {"device": "cpu"} if runtime == "torch" else {}
        with open_runtime(runtime, artifact, precision=precision, **options) as rt:
            x, t, cond = inputs(rt.contract)
            ref = time_calls(rows, name, rt, x, t, cond, repeats, ref)
        del rt
        gc.collect()
    return with_speedups(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/latte1"), help="model and export directories")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/cpu/latte1.json"))
    parser.add_argument("--stages", default="export,verify,int8,time")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model_dir, out = args.work / "model", args.work / "export"
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    results.setdefault("machine", {"cpu": platform.processor() or platform.machine(), "threads": os.cpu_count(),
                                   "python": platform.python_version()})
    results["config"] = {**LATTE1, "latents": [4, 16, 32, 32], "tokens": TOKENS}
    make_model(model_dir)
    stages = {"export": lambda: stage_export(model_dir, out), "verify": lambda: stage_verify(out),
              "int8": lambda: stage_int8(out), "time": lambda: stage_time(model_dir, out, args.repeats)}
    for name in args.stages.split(","):
        if name in results:
            print(f"{name}: done before ({args.json}), skipped")
            continue
        print(f"== {name}", flush=True)
        results[name] = stages[name]()
        results[name]["date"] = time.strftime("%Y-%m-%d %H:%M")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results[name], indent=1), flush=True)


if __name__ == "__main__":
    main()
