"""The video DiT families at full size on this CPU: the Wan 2.1 1.3B architecture (WanTransformer3DModel: 30
layers, 12 heads x 128 = 1536 wide, FFN 8960, umT5 width 4096; 1.42 B parameters, 5.7 GB fp32) and
CogVideoX-2B (30 layers, 30 heads x 64, sincos positions; 1.69 B, 6.8 GB), both at latents 16 x 5 x 30 x 52,
with random weights, saved as a
pipeline is (transformer/ sharded safetensors + scheduler/ with the family's scheduler config), through:

    export   `vdit export DIR --out OUT --no-verify --batch 1:2 --latent C,F,H,W` in a child process:
             seconds, peak RSS, file sizes (external data over 2 GB); the contract is the family's own
             (Wan: flow matching, UniPC with flow sigmas, from the scheduler config)
    verify   export/verify.verify on a short trajectory (1 video, 2 steps, 1 replayed step)
    int8     dynamic INT8 (calibration/int8.quantize_int8, one weight at a time): seconds, size, peak RSS
    time     seconds per denoiser call at batch 1: PyTorch fp32 (the torch runtime rebuilt from the export),
             ONNX Runtime fp32 and INT8, median of --repeats after a warm-up call, in one run

Each stage writes its row into --json as it ends and is skipped when there (a rerun resumes).
Random weights: the speed, memory and numerics of the size, not a model's videos.

    OMP_NUM_THREADS=2 python benchmarks/bench_families.py --family wan --work /tmp/wan13 \
        --json benchmarks/cpu/wan1.3b-HOST-DATE.json --threads 2
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
from bench_latte import stage_int8, stage_verify
from common import time_calls, with_speedups

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json; latents 16 x 5 x 30 x 52 (17 frames at 240 x 416)
FAMILIES = {
    "wan": dict(cls="WanTransformer3DModel", latent=(16, 5, 30, 52), tokens=512,
                config=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)),
    # THUDM/CogVideoX-2b transformer/config.json at Wan's small latent, 16 x 5 x 30 x 52 (17 frames at 240 x 416:
    # 1,950 video + 226 text tokens): at its own 13 x 60 x 90 (17,776 tokens) one attention's fp32 scores are
    # 30 x 17,776^2 x 4 B = 37.9 GB, past this 24 GB machine
    "cogvideox": dict(cls="CogVideoXTransformer3DModel", latent=(16, 5, 30, 52), tokens=226,
                      config=dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16,
                                  time_embed_dim=512, text_embed_dim=4096, num_layers=30, sample_width=90,
                                  sample_height=60, sample_frames=49, patch_size=2, max_text_seq_length=226,
                                  use_rotary_positional_embeddings=False)),
}


def scheduler(family: str):
    import diffusers

    if family == "wan":   # WanPipeline's: UniPC with flow sigmas, shift 3 (480p)
        return diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    # CogVideoX's schedule in a scheduler vdit reads today (CogVideoXDDIM's zero-SNR reading: issue 20)
    return diffusers.UniPCMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             prediction_type="v_prediction", timestep_spacing="trailing")


def make_model(family: str, root: Path) -> Path:
    import diffusers
    import torch

    path = root / "transformer"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    model = getattr(diffusers, FAMILIES[family]["cls"])(**FAMILIES[family]["config"])
    with torch.no_grad():   # a fresh DiT has zero output layers: open them
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(path, max_shard_size="2GB")
    scheduler(family).save_pretrained(root / "scheduler")
    return path


def stage_export(family: str, model_dir: Path, out: Path) -> dict:
    start = time.perf_counter()
    latent = ",".join(map(str, FAMILIES[family]["latent"]))    # not the pipeline's default resolution
    command = [sys.executable, "-m", "vdit_deploy.cli", "export", str(model_dir), "--out", str(out), "--no-verify",
               "--batch", "1:2", "--latent", latent]
    subprocess.run(command, check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(peak / 2 ** 20, 2),
            "how": " ".join(command[1:3]), "files_mb": {p.name: round(p.stat().st_size / 1e6, 1)
                                                         for p in sorted(out.iterdir())}}


def stage_time(out: Path, tokens: int, repeats: int) -> dict:
    """One runtime at a time (each holds the model), closed before the next opens."""
    import gc

    from vdit_deploy.export.metadata import read_metadata
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.runtimes.torch_runtime import TorchRuntime
    from vdit_deploy.sources import load_export_source

    rows, ref = {}, None
    for name, precision in (("torch fp32", "fp32"), ("ort fp32", "fp32"), ("ort int8-dynamic", "int8")):
        if precision == "int8" and not (out / "denoiser.int8-dynamic.onnx").is_file():
            continue   # the int8 stage did not finish (its row says why)
        if name.startswith("torch"):   # rebuilt from the export alone: the contract's family record
            rt = TorchRuntime(None, source=load_export_source(read_metadata(out / "denoiser.onnx"), out), device="cpu")
        else:
            rt = open_runtime("ort", out, precision=precision)
        with rt:
            rng = np.random.default_rng(0)
            x = rng.standard_normal((1, *rt.contract.latent), dtype=np.float32)
            cond, t = rt.contract.example_cond(1, rng, {"seq": tokens}), np.array([500.0], np.float32)
            ref = time_calls(rows, name, rt, x, t, cond, repeats, ref)
        del rt
        gc.collect()
    return with_speedups(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="wan")
    parser.add_argument("--work", type=Path, default=None, help="model and export directories (default /tmp/FAMILY)")
    parser.add_argument("--json", type=Path, default=None, help="default benchmarks/cpu/FAMILY.json")
    parser.add_argument("--stages", default="export,verify,int8,time")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch and ONNX Runtime alike (default: every core; vdit's own default subtracts the "
                             "load, which would give the runtimes different counts within one run)")
    args = parser.parse_args()
    from vdit_deploy import threads
    threads.configure(args.threads)
    work, spec = args.work or Path(f"/tmp/{args.family}"), FAMILIES[args.family]
    json_path = args.json or Path(f"benchmarks/cpu/{args.family}.json")
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    results.setdefault("machine", {"cpu": platform.processor() or platform.machine(), "threads": os.cpu_count(),
                                   "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "runtime_threads": args.threads,
                                   "python": platform.python_version()})
    results["config"] = {**spec["config"], "class": spec["cls"], "latents": list(spec["latent"]),
                         "tokens": spec["tokens"]}
    model_dir, out = make_model(args.family, work), work / "export"
    stages = {"export": lambda: stage_export(args.family, model_dir, out), "verify": lambda: stage_verify(out),
              "int8": lambda: stage_int8(out), "time": lambda: stage_time(out, spec["tokens"], args.repeats)}
    # stages in this process (verify, int8, time): the process's peak RSS so far, recorded with each
    for name in args.stages.split(","):
        if name in results:
            print(f"{name}: done before ({json_path}), skipped")
            continue
        print(f"== {name}", flush=True)
        results[name] = stages[name]()
        results[name]["date"] = time.strftime("%Y-%m-%d %H:%M")
        results[name]["load_average"] = os.getloadavg()
        if name != "export":   # the export's peak is its child's
            results[name]["peak_rss_gb_so_far"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results[name], indent=1), flush=True)


if __name__ == "__main__":
    main()
