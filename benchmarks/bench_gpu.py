"""GPU benchmark: every runtime that can run here, on identical inputs and noise.

    python benchmarks/bench_gpu.py --presets tiny,B16 --steps 50 --out benchmarks/gpu

Rows: PyTorch eager fp32 / fp16 / bf16, torch.compile fp16 with CUDA graphs (reduce-overhead; add
max-autotune with --compile-modes), ONNX Runtime's CUDA provider fp32 / fp16 (fused step.onnx with
I/O binding: the video stays on the GPU), TensorRT fp32 / fp16 / int8 where `tensorrt` imports.
Per row: one denoiser call (guided batch 2: cond + null), one fused sampler step, a full DDIM sample
of one video, the share of that sample spent outside the GPU graph, GPU memory, and accuracy against
PyTorch eager fp32 on the same inputs (eps relative L2) and the same noise (final-video PSNR over the
[-1, 1] range). Writes OUT/gpu_results.json after every row (a run cut short keeps what it measured)
and OUT/gpu_table.md at the end. Run by benchmarks/gpu_check.sh; needs an NVIDIA GPU.

"outside %" = 1 - steps x (one step of the bare graph, inputs already on the GPU) / (sample wall time):
the host's share of a sample (uploads of t, the conditioning, coefs and noise, bindings, Python, launches not hidden
behind the GPU). Target: < 5%.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
import traceback
from pathlib import Path

import numpy as np

from common import median_seconds, random_checkpoint
from vdit_deploy.export.variants import FP16, INT8_QDQ, STEP, find_variant, variant_file
from vdit_deploy.metrics import psnr, rel_l2

HERE = Path(__file__).resolve().parent
TARGETS = {"ort_fp16_speedup": 3.0, "fp16_psnr_db": 40.0, "outside_pct": 5.0}


def config_for(name: str):
    from vdit_deploy.config import preset

    if name == "B16":   # the issue's shape: B preset at 16x32x32 latents
        return preset("B", frames=16)
    return preset(name)


def bare_step_seconds(rt, x, t, cond, guidance, coefs, noise, repeats: int, sync) -> float | None:
    """One fused step with every input already on the GPU and nothing else: the floor a sample's
    steps cannot go under. Reaches into the runtime on purpose: it times the graph, not the wrapper.
    `cond`: the conditioning of x's videos; the null conditioning is the runtime's own."""
    from vdit_deploy.export.metadata import NULL_PREFIX, STEP_STATE

    null = rt.contract.null_batch(rt.null, cond)
    if rt.name == "torch":
        import torch

        dev = lambda a, dt=torch.float32: torch.from_numpy(np.ascontiguousarray(a)).to(rt.device, dt)   # noqa: E731
        args = (dev(x), dev(np.full(len(x), t, np.float32)), *rt._cond(cond), *rt._cond(null),
                dev(np.float32([guidance])), dev(coefs), dev(noise), dev(np.zeros_like(x)), dev(np.zeros_like(x)))

        def run():
            if rt.compile:
                torch.compiler.cudagraph_mark_step_begin()
            rt.guided(*args)
        return median_seconds(run, repeats, sync=sync)
    if rt.name == "ort" and rt.fused is not None:
        import onnxruntime as ort

        graph = rt.fused
        binding = graph.session.io_binding()
        feeds = graph.feeds(x_t=x, t=np.full(len(x), t, np.float32), **cond,
                            **{NULL_PREFIX + k: v for k, v in null.items()}, guidance=np.float32([guidance]),
                            coefs=coefs, noise=noise, **{name: np.zeros_like(x) for name, _ in STEP_STATE})
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, graph.device_type, 0))
        for output in graph.output_names:
            binding.bind_output(output, graph.device_type)
        return median_seconds(lambda: graph.session.run_with_iobinding(binding), repeats)
    if rt.name == "trt":
        def run():
            rt.step_engine.execute()
            rt.cudart.cudaStreamSynchronize(rt.stream)
        return median_seconds(run, repeats)
    return None


class GpuMemory:
    """Device memory taken while a runtime is open (cudaMemGetInfo); torch's own peak for torch rows.
    On --device cpu (a smoke run of this script) every figure is 0."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.free0 = torch.cuda.mem_get_info()[0]

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def used_mib(self, torch_rows: bool) -> float:
        if not self.cuda:
            return 0.0
        if torch_rows:   # torch's allocator knows its true peak; the device counter misses freed blocks
            return self.torch.cuda.max_memory_allocated() / 2 ** 20
        return (self.free0 - self.torch.cuda.mem_get_info()[0]) / 2 ** 20


def bench_runtime(label, opener, cfg, steps_n, repeats, reference, device):
    from vdit_deploy.samplers import make_steps
    from vdit_deploy.sampling import SampleTimes, sample

    memory = GpuMemory(device)
    t_open = time.perf_counter()
    rt = opener()
    try:
        contract = rt.contract
        steps = make_steps(rt.schedule, "ddim", steps_n, prediction=contract.prediction)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, *contract.latent), dtype=np.float32)
        t = np.full(2, steps[len(steps) // 2].t, np.float32)
        cond = contract.labels([1])                                # one video's conditioning ...
        both = {k: np.concatenate([v, rt.null[k]]) for k, v in cond.items()}   # ... and the null: guided batch 2
        out = rt.denoise(x, t, both)
        open_s = time.perf_counter() - t_open
        call = median_seconds(lambda: rt.denoise(x, t, both), repeats)
        sample(rt, contract, cond, steps, guidance=2.0, seed=0)        # warm-up: compile, capture, autotune
        times = SampleTimes()
        video = sample(rt, contract, cond, steps, guidance=2.0, seed=0, times=times)
        mid = steps[len(steps) // 2]
        bare = bare_step_seconds(rt, x[:1], mid.t, cond, 2.0, mid.coefs, np.zeros_like(x[:1]), repeats,
                                 memory.sync)
        row = {"runtime": label, "describe": rt.describe(), "open_s": open_s, "denoise_ms": 1e3 * call,
               "step_ms": 1e3 * float(np.median(times.steps)), "sample_s": times.total,
               "gpu_peak_mib": memory.used_mib(rt.name == "torch")}
        if bare is not None:
            row["bare_step_ms"] = 1e3 * bare
            row["outside_pct"] = 100 * max(0.0, 1 - len(steps) * bare / times.total)
    finally:
        rt.close()
    if reference is not None:
        row["eps_rel_l2"] = rel_l2(out, reference[0])
        row["video_psnr_db"] = psnr(video, reference[1])
    if not np.isfinite(video).all():
        row["error"] = "non-finite values in the sampled video"
    return row, (out, video)


def open_trt(export: Path, precision: str):
    """Build (or find cached) the engines, then load them: the runtime itself never builds."""
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.runtimes.trt_build import KINDS, find_engine

    for kind in KINDS:
        find_engine(export, kind, precision, build=True)
    return open_runtime("trt", export, precision=precision)


def runs_for(ckpt, export, compile_modes, device):
    import onnxruntime as ort

    from vdit_deploy.runtimes import open_runtime

    # torch fp32 first: every later row is measured against it; torch.compile last: it compiles for minutes
    runs = [(f"torch {p}", lambda p=p: open_runtime("torch", ckpt, precision=p, device=device))
            for p in ("fp32", "fp16", "bf16")]
    provider = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[device]
    if provider in ort.get_available_providers():
        runs += [(f"ort {device} {p}", lambda p=p: open_runtime("ort", export, precision=p, providers=[provider]))
                 for p in ("fp16", "fp32")]
    else:
        runs.append((f"ort {device}", "onnxruntime has no CUDAExecutionProvider: pip install onnxruntime-gpu"))
    runs += [(f"torch.compile fp16 {m}",
              lambda m=m: open_runtime("torch", ckpt, precision="fp16", device=device, compile=m))
             for m in compile_modes]
    try:
        import tensorrt  # noqa: F401
        for p in ("fp32", "fp16", "int8"):
            if p == "int8" and find_variant(export, STEP, INT8_QDQ) is None:
                runs.append(("trt int8", f"no {variant_file(STEP, INT8_QDQ)} (vdit calibrate int8 --mode qdq --target tensorrt)"))
                continue
            runs.append((f"trt {p}", lambda p=p: open_trt(export, p)))
    except Exception as e:   # ImportError, or OSError when the bindings find no libnvinfer
        runs.append(("trt", f"tensorrt does not import: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
    return runs


def table(rows) -> str:
    head = ("| preset | runtime | call ms | step ms | bare step ms | sample s | outside % | GPU MiB "
            "| eps relL2 | PSNR dB |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    f = lambda v, spec: "" if v is None else format(v, spec)   # noqa: E731
    for r in rows:
        if "skipped" in r or "error" in r and "denoise_ms" not in r:
            lines.append(f"| {r['preset']} | {r['runtime']} | {r.get('skipped') or 'error: ' + r['error']} "
                         "| | | | | | | |")
            continue
        lines.append(f"| {r['preset']} | {r['runtime']} | {f(r['denoise_ms'], '.2f')} | {f(r['step_ms'], '.2f')} "
                     f"| {f(r.get('bare_step_ms'), '.2f')} | {f(r['sample_s'], '.3f')} "
                     f"| {f(r.get('outside_pct'), '.1f')} | {f(r['gpu_peak_mib'], '.0f')} "
                     f"| {f(r.get('eps_rel_l2'), '.1e') or 'ref'} | {f(r.get('video_psnr_db'), '.1f') or 'ref'} |")
    return "\n".join(lines)


def verdicts(rows) -> list[str]:
    """The issue's goals, read off this run's rows (ratios from one run only)."""
    out = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        by = {r["runtime"]: r for r in rows if r["preset"] == preset and "denoise_ms" in r}
        if "torch fp32" in by and "ort cuda fp16" in by:
            ratio = by["torch fp32"]["denoise_ms"] / by["ort cuda fp16"]["denoise_ms"]
            out.append(f"{preset}: ORT CUDA fp16 per call = {ratio:.2f}x torch eager fp32 "
                       f"(goal >= {TARGETS['ort_fp16_speedup']}x)")
        for label, r in by.items():
            if "fp16" in label and r.get("video_psnr_db") is not None:
                out.append(f"{preset}: {label} final-video PSNR {r['video_psnr_db']:.1f} dB "
                           f"(goal >= {TARGETS['fp16_psnr_db']} dB)")
            if r.get("outside_pct") is not None:
                out.append(f"{preset}: {label} outside the graph {r['outside_pct']:.1f}% of a sample "
                           f"(goal < {TARGETS['outside_pct']}%)")
    return out


def prepare(name: str, work: Path):
    """Checkpoint, fp32 export and fp16 variants for one preset (reused when already there)."""
    from vdit_deploy.calibration.fp16 import convert_fp16
    from vdit_deploy.checkpoint import SHIPPED
    from vdit_deploy.export.onnx_export import export_checkpoint

    cfg = config_for(name)
    ckpt = SHIPPED if name == "tiny" else random_checkpoint(cfg, work / f"ckpt-{name}")
    export = work / f"export-{name}"
    if find_variant(export, STEP) is None:
        t0 = time.perf_counter()
        export_checkpoint(ckpt, export, batch=(1, 2))
        print(f"[{name}] exported in {time.perf_counter() - t0:.1f} s", flush=True)
    if find_variant(export, STEP, FP16) is None:
        t0 = time.perf_counter()
        convert_fp16(export)
        print(f"[{name}] fp16 variants in {time.perf_counter() - t0:.1f} s", flush=True)
    return cfg, ckpt, export


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="B16,tiny")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--compile-modes", default="reduce-overhead",
                    help="comma-separated torch.compile modes to time ('' for none; max-autotune takes minutes)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/vdit-gpu"))
    ap.add_argument("--out", type=Path, default=HERE / "gpu")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a smoke run of this script where there is no GPU (numbers mean nothing)")
    ap.add_argument("--rows", default="",
                    help="comma-separated labels of the rows to run, e.g. 'torch fp32,ort cuda fp16' (default: all)")
    ap.add_argument("--prepare", action="store_true",
                    help="only write the checkpoints, exports and fp16 variants under --work (no GPU needed)")
    args = ap.parse_args(argv)
    if args.prepare:
        args.work.mkdir(parents=True, exist_ok=True)
        for name in args.presets.split(","):
            prepare(name, args.work)
        return

    import onnxruntime as ort
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: torch sees no CUDA GPU (--device cpu runs a smoke test of this script)")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
               "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1)}
    else:
        gpu = {"gpu": f"none (cpu smoke run: {platform.processor() or platform.machine()})",
               "compute_capability": "-", "gpu_memory_gib": 0}
    record = {**gpu,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "torch": torch.__version__, "cuda": torch.version.cuda, "onnxruntime": ort.__version__,
              "python": platform.python_version(), "steps": args.steps, "sampler": "ddim", "guidance": 2.0,
              "rows": []}
    modes = [m for m in args.compile_modes.split(",") if m]
    for name in args.presets.split(","):
        cfg, ckpt, export = prepare(name, args.work)
        reference = None   # per preset: torch eager fp32 is the first row
        for label, opener in runs_for(ckpt, export, modes, args.device):
            if args.rows and label not in args.rows.split(","):
                continue
            base = {"preset": name, "runtime": label, "shape": "x".join(map(str, cfg.video_shape))}
            if isinstance(opener, str):
                row = {**base, "skipped": opener}
            else:
                try:
                    row, outs = bench_runtime(label, opener, cfg, args.steps, args.repeats, reference, args.device)
                    row = {**base, **row}
                    if label == "torch fp32":   # the reference every other row is measured against
                        reference = outs
                except Exception as e:   # one failing backend must not hide the others' numbers
                    row = {**base, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
                    traceback.print_exc()
            record["rows"].append(row)
            print(json.dumps(row), flush=True)
            (args.out / "gpu_results.json").write_text(json.dumps(record, indent=2) + "\n")
    record["verdicts"] = verdicts(record["rows"])
    (args.out / "gpu_results.json").write_text(json.dumps(record, indent=2) + "\n")
    md = (f"GPU: {record['gpu']} (sm {record['compute_capability']}, {record['gpu_memory_gib']} GiB), "
          f"{record['date']}; torch {record['torch']} (CUDA {record['cuda']}), onnxruntime {record['onnxruntime']}; "
          f"{args.steps} DDIM steps, guidance 2, one video (denoiser batch 2).\n\n{table(record['rows'])}\n\n"
          + "\n".join(f"- {v}" for v in record["verdicts"]) + "\n")
    (args.out / "gpu_table.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
