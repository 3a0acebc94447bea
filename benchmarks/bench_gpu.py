"""GPU benchmark: PyTorch eager fp32 / bf16, ONNX Runtime CUDA, TensorRT fp32 / fp16 / int8.

    python benchmarks/bench_gpu.py --presets tiny,S,B16 --steps 50 --json benchmarks/gpu_results.json

Per runtime and preset: one denoiser call (guided batch 2), one sampler step, a full DDIM sample,
GPU memory, and error against PyTorch fp32 with the same inputs and the same noise (relative L2 of eps,
PSNR of the final video over its [-1, 1] range). For TensorRT also the share of the sampling loop spent
outside the engine (CUDA-graph target: < 5%). Prints a table, writes JSON, appends to RESULTS.md.
Run by benchmarks/gpu_check.sh; needs an NVIDIA GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np

from vdit_deploy.metrics import psnr

HERE = Path(__file__).resolve().parent


def config_for(name: str):
    from vdit_deploy.config import preset

    if name == "B16":   # the 3x target's shape: B preset at 16x32x32 latents
        return preset("B", frames=16)
    return preset(name)


def random_checkpoint(cfg, path: Path) -> Path:
    """Random weights with the adaLN-Zero gates opened, so outputs are not trivially zero."""
    import torch

    from vdit_deploy.checkpoint import save_checkpoint
    from vdit_deploy.diffusion import Schedule
    from vdit_deploy.model import VideoDiT

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    model = VideoDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_checkpoint(path, model.state_dict(), cfg, Schedule(), step=0, ema=False)
    return path


def gpu_used_mib() -> float:
    from vdit_deploy.runtimes.engine_cache import import_cudart

    free, total = import_cudart().cudaMemGetInfo()[1:]
    return (total - free) / 2 ** 20


def timed(fn, repeats: int) -> float:
    fn()   # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def bench_runtime(label, opener, cfg, steps, reference, repeats):
    from vdit_deploy.sampling import SampleTimes, sample

    base = gpu_used_mib()
    rt = opener()
    try:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, *cfg.video_shape), dtype=np.float32)
        t, y = np.array([500, 500], np.float32), np.array([1, cfg.null_label], np.int32)
        eps = rt.denoise(x, t, y)
        call = timed(lambda: rt.denoise(x, t, y), repeats)
        times = SampleTimes()
        sample(rt, cfg, [1], steps, guidance=2.0, seed=0)   # warm-up (builds graphs)
        video = sample(rt, cfg, [1], steps, guidance=2.0, seed=0, times=times)
        row = {"runtime": label, "denoise_ms": 1e3 * call, "step_ms": 1e3 * times.total / len(steps),
               "sample_s": times.total, "gpu_mib": gpu_used_mib() - base, "describe": rt.describe()}
        if hasattr(rt, "step_engine"):   # time the engine alone: the rest of the loop is overhead
            engine = rt.step_engine
            cudart = rt.cudart
            t0 = time.perf_counter()
            for _ in range(len(steps)):
                engine.execute()
            cudart.cudaStreamSynchronize(rt.stream)
            row["outside_engine_pct"] = 100 * max(0.0, 1 - (time.perf_counter() - t0) / times.total)
        if hasattr(rt, "model"):         # torch: its allocator knows the true peak
            import torch
            row["gpu_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    finally:
        rt.close()
    if reference is not None:
        row["eps_rel_l2"] = float(np.linalg.norm(eps - reference[0]) / np.linalg.norm(reference[0]))
        row["video_psnr_db"] = psnr(video, reference[1])
    return row, (eps, video)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="tiny,S,B16")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vdit-gpu"))
    ap.add_argument("--json", type=Path, default=HERE / "gpu_results.json")
    ap.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--prepare", action="store_true", help="only write checkpoints and exports under --work")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from vdit_deploy.checkpoint import SHIPPED
    from vdit_deploy.diffusion import Schedule, make_steps
    from vdit_deploy.export.onnx_export import export_checkpoint
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.runtimes.engine_cache import gpu_info

    gpu = gpu_info()
    rows = []
    if args.prepare:
        args.work.mkdir(parents=True, exist_ok=True)
    for name in args.presets.split(","):
        cfg = config_for(name)
        ckpt = SHIPPED if name == "tiny" else random_checkpoint(cfg, args.work / f"ckpt-{name}")
        export = args.work / f"export-{name}"
        if not (export / "step.onnx").is_file():
            export_checkpoint(ckpt, export, batch=(1, 8))
        if args.prepare:
            print(f"{name} checkpoint={ckpt} export={export}")
            continue
        steps = make_steps(Schedule(), "ddim", args.steps)
        torch.cuda.reset_peak_memory_stats()
        runs = [("torch fp32", lambda: open_runtime("torch", ckpt, precision="fp32"))]
        runs.append(("torch bf16", lambda: open_runtime("torch", ckpt, precision="bf16")))
        if "CUDAExecutionProvider" in ort.get_available_providers():
            runs.append(("ort cuda", lambda: open_runtime("ort", export, providers=["cuda"])))
        for precision in ("fp32", "fp16", "int8"):
            if precision == "int8" and not (export / "step.int8.onnx").is_file():
                print(f"[{name}] no step.int8.onnx (run `vdit calibrate`): TensorRT int8 skipped")
                continue
            runs.append((f"trt {precision}", lambda p=precision: open_runtime("trt", export, precision=p)))
        reference = None
        for label, opener in runs:
            torch.cuda.reset_peak_memory_stats()
            try:
                row, outs = bench_runtime(label, opener, cfg, steps, reference, args.repeats)
            except Exception as e:   # one failing backend must not hide the others' numbers
                row, outs = {"runtime": label, "error": f"{type(e).__name__}: {e}"}, None
            reference = reference or outs
            row.update(preset=name, shape="x".join(map(str, cfg.video_shape)))
            rows.append(row)
            print(json.dumps(row))

    if args.prepare:
        return
    header = (f"{'preset':<6} {'runtime':<11} {'call ms':>8} {'step ms':>8} {'50-step s':>9} {'GPU MiB':>8} "
              f"{'eps relL2':>10} {'PSNR dB':>8} {'outside%':>8}")
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['preset']:<6} {r['runtime']:<11} error: {r['error'][:80]}")
            continue
        lines.append(f"{r['preset']:<6} {r['runtime']:<11} {r['denoise_ms']:>8.2f} {r['step_ms']:>8.2f} "
                     f"{r['sample_s']:>9.3f} {r['gpu_mib']:>8.0f} {r.get('eps_rel_l2', 0):>10.2e} "
                     f"{r.get('video_psnr_db', float('inf')):>8.1f} "
                     f"{r.get('outside_engine_pct', float('nan')):>8.1f}")
    table = "\n".join(lines)
    print(table)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import tensorrt
    record = {"gpu": gpu.name, "compute_capability": gpu.compute_capability, "date": stamp,
              "tensorrt": tensorrt.__version__, "torch": torch.__version__, "onnxruntime": ort.__version__,
              "steps": args.steps, "rows": rows}
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    with open(args.results_md, "a") as f:
        f.write(f"\n## GPU check: {gpu.name} (sm {gpu.compute_capability}), {stamp}\n\n"
                f"TensorRT {tensorrt.__version__}, torch {torch.__version__}, onnxruntime {ort.__version__}; "
                f"{args.steps} DDIM steps, guidance 2, one video (denoiser batch 2).\n\n```\n{table}\n```\n")
    print(f"wrote {args.json} and appended to {args.results_md}")


if __name__ == "__main__":
    main()
