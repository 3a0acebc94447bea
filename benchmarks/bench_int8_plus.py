"""INT8 beyond the fix: per-timestep-bin Q/DQ scales, SmoothQuant alphas, NVIDIA ModelOpt's ONNX PTQ
(INT8 and FP8 Q/DQ) against onnxruntime.quantization, all on ONNX Runtime's CPU provider.

    python benchmarks/bench_int8_plus.py --work DIR [--bins 1,3,5] [--smooth 0.5,0.8] [--modelopt int8,fp8]
                                         [--json out.json]

The shipped checkpoint, exported once; a calibration set of the default sampler (UniPC 15 steps,
guidance 2, 4 seeds, --timesteps of its 15 steps); every variant is the Q/DQ denoiser of its own copy
of the export (`vdit calibrate int8 --mode qdq` with --t-bins / --smooth; reused from --work when
there). Per variant:
  - per-call relative L2 of the denoiser output against fp32 on the calibration set, by timestep;
  - PSNR / SSIM of the final videos (worst seed) and the teacher-forced eps rel L2, sampled with the
    default sampler against ONNX Runtime fp32 with the same noise (vdit calibrate report's numbers);
  - the median per-call latency at batch 2 (one guided call).
ModelOpt (`pip install nvidia-modelopt` with its [onnx] extras' pure-Python parts, in a venv of its own:
it pins other onnx / onnxruntime versions) is imported only for --modelopt; its graphs get the
export's metadata copied over. An FP8 graph that ONNX Runtime cannot load is checked by conformance
instead (onnx.checker full check and shape inference), and the JSON says which.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from common import median_seconds, write_report
from vdit_deploy.export.variants import DENOISER, INT8_QDQ, variant_file

QDQ = variant_file(DENOISER, INT8_QDQ)


def machine() -> dict:
    import onnx
    import onnxruntime

    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").is_file() else set()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if flags else platform.processor()
    versions = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
    try:
        import modelopt
        versions["nvidia-modelopt"] = modelopt.__version__
    except ImportError:
        pass
    return {"cpu": cpu, "isa": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "asimddp"}),
            "versions": versions, "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "date": datetime.now(timezone.utc).isoformat(timespec="minutes")}


def prepare(work: Path, timesteps: int) -> tuple[Path, Path]:
    from vdit_deploy.calibration.collect import collect
    from vdit_deploy.checkpoint import SHIPPED
    from vdit_deploy.export.onnx_export import export_checkpoint

    export, calib = work / "fp32", work / "calib"
    if not (export / "denoiser.onnx").is_file():
        export_checkpoint(SHIPPED, export, batch=(1, 16))
    if not (calib / "manifest.json").is_file():
        collect(export, calib, timesteps=timesteps)     # the default sampler, guidance 2, 4 seeds
    return export, calib


def copy_export(export: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in export.iterdir():
        if f.is_file():
            shutil.copy2(f, dest / f.name)
    return dest


def ort_variant(export, calib, work, name, **options) -> Path:
    from vdit_deploy.calibration.int8 import quantize_int8

    dest = work / name
    if not (dest / QDQ).is_file():
        copy_export(export, dest)
        start = time.perf_counter()
        quantize_int8(dest, calib, mode="qdq", **options)
        (dest / "made.json").write_text(json.dumps({"options": options,
                                                    "seconds": round(time.perf_counter() - start, 1)}))
    return dest


def modelopt_variant(export, calib, work, mode: str) -> tuple[Path, dict]:
    """ModelOpt's ONNX PTQ of the denoiser (the same layers as ours, its default calibration: entropy
    for int8, max for fp8), fp32 kept for the rest; the export's metadata copied onto it."""
    import onnx

    from vdit_deploy.calibration.collect import load_calibration_set
    from vdit_deploy.calibration.fp16 import save_variant
    from vdit_deploy.calibration.graph import COMPUTE_OPS, select
    from vdit_deploy.calibration.int8 import DEFAULT_SENSITIVE

    dest = work / f"modelopt-{mode}"
    facts = json.loads((dest / "made.json").read_text()) if (dest / "made.json").is_file() else None
    if facts is None:
        from modelopt.onnx.quantization import quantize

        copy_export(export, dest)
        for step in dest.glob("step.onnx*"):    # a denoiser-only variant: the runtime takes the host step
            step.unlink()
        src = export / "denoiser.onnx"
        model = onnx.load(str(src))
        nodes = [n for n in select(model, list(COMPUTE_OPS), COMPUTE_OPS)
                 if n not in set(select(model, DEFAULT_SENSITIVE, COMPUTE_OPS))]
        props = [(p.key, p.value) for p in model.metadata_props]
        del model
        cset = load_calibration_set(calib)
        call = cset.manifest["call_batch"]
        shapes = ",".join(f"{k}:{'x'.join(map(str, [call, *a.shape[1:]]))}" for k, a in cset.rows(0, 1).items())
        raw = dest / "modelopt.onnx"
        start = time.perf_counter()
        quantize(str(src), quantize_mode=mode, calibration_data={k: np.ascontiguousarray(a) for k, a in
                                                                  cset.rows(0, len(cset)).items()},
                 calibration_shapes=shapes, calibration_eps=["cpu"], op_types_to_quantize=list(COMPUTE_OPS),
                 nodes_to_quantize=nodes, high_precision_dtype="fp32", disable_mha_qdq=True,
                 output_path=str(raw), log_level="ERROR")
        seconds = time.perf_counter() - start
        q = onnx.load(str(raw))
        del q.metadata_props[:]
        for k, v in props:
            q.metadata_props.add(key=k, value=v)
        save_variant(q, dest / QDQ, INT8_QDQ)
        raw.unlink()
        facts = {"options": {"modelopt": mode, "nodes": len(nodes)}, "seconds": round(seconds, 1),
                 **conformance(dest / QDQ)}
        (dest / "made.json").write_text(json.dumps(facts))
    return dest, facts


def conformance(path: Path) -> dict:
    """Does ONNX Runtime CPU load it (reference kernels), or only the onnx checker / shape inference?"""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    out = {"onnx_checker": "ok", "shape_inference": "ok"}
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        out["onnx_checker"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    try:
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as e:
        out["shape_inference"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out["ort_cpu"] = "loads"
    except Exception as e:
        out["ort_cpu"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return out


def evaluate(path: Path, ref, cset, plan, served, refs, seeds, repeats: int) -> dict:
    from vdit_deploy.compare.measure import accuracy, teacher_forced
    from vdit_deploy.runtimes.ort_runtime import OrtRuntime
    from vdit_deploy.sampling import sample

    rt = OrtRuntime(path, INT8_QDQ, providers=["cpu"])
    per_t: dict = {}
    for r in cset.manifest["records"]:       # per call, on the calibration set
        a, b = r["rows"]
        f = cset.rows(a, b)
        cond = {k: f[k] for k in cset.contract.names}
        got, want = rt.denoise(f["x_t"], f["t"], cond), ref.denoise(f["x_t"], f["t"], cond)
        per_t.setdefault(r["t"], []).append(float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    per_t = {t: float(np.mean(v)) for t, v in sorted(per_t.items(), reverse=True)}
    videos = {s: sample(rt.denoise, rt.contract, served, plan, 2.0, s, null=rt.null) for s in seeds}
    eps = [teacher_forced(rt.denoise, refs[s][1])[0] for s in seeds]
    acc = accuracy(videos, {s: refs[s][0] for s in seeds}, eps, seeds)
    x, t = cset.rows(0, 2)["x_t"], cset.rows(0, 2)["t"]
    cond = {k: a[:2] for k, a in cset.rows(0, 2).items() if k in cset.contract.names}
    bins = rt.graph.bins
    return {"psnr_db": acc["psnr_db"], "ssim": acc["ssim"], "eps_rel_l2_mean": acc["eps_rel_l2_mean"],
            "call_rel_l2_mean": float(np.mean(list(per_t.values()))), "call_rel_l2_by_t": per_t,
            "bins_edges": None if bins is None else bins[0],
            "ms_per_call_b2": 1e3 * median_seconds(lambda: rt.denoise(x, t, cond), repeats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--bins", default="1,3,5", help="--t-bins values, each N or N:METHOD (1: one set of scales, "
                    "the baseline; METHOD: minmax, percentile (default) or entropy)")
    ap.add_argument("--smooth", default="0.5,0.8", help="SmoothQuant alphas (one set of scales)")
    ap.add_argument("--modelopt", default="", help="int8,fp8: ModelOpt's PTQ too (needs nvidia-modelopt)")
    ap.add_argument("--timesteps", type=int, default=15, help="timesteps recorded per trajectory")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from vdit_deploy.calibration.collect import load_calibration_set
    from vdit_deploy.calibration.int8 import DEFAULT_METHOD
    from vdit_deploy.compare.measure import record_calls
    from vdit_deploy.runtimes.ort_runtime import OrtRuntime
    from vdit_deploy.samplers import DEFAULT_SAMPLER
    from vdit_deploy.sampling import conditioning, sampler_plan

    args.work.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "sampler": DEFAULT_SAMPLER, "command": "python benchmarks/bench_int8_plus.py "
              f"--bins {args.bins} --smooth {args.smooth} --modelopt {args.modelopt or '-'} "
              f"--timesteps {args.timesteps} --seeds {args.seeds}", "variants": {}}
    export, calib = prepare(args.work, args.timesteps)
    cset = load_calibration_set(calib)
    ref = OrtRuntime(export, "fp32", providers=["cpu"])
    plan = sampler_plan(ref.contract, DEFAULT_SAMPLER, None, 0.0)
    served = conditioning(ref.contract, None, None)
    seeds = list(range(args.seeds))
    refs = {s: record_calls(ref.denoise, ref.contract, served, plan, 2.0, s, ref.null)[:2] for s in seeds}
    report.update(steps=len(plan), seeds=seeds, calibration_rows=len(cset), timesteps=cset.manifest["timesteps"])
    jobs = []
    for spec in filter(None, args.bins.split(",")):      # N or N:METHOD
        n, _, method = spec.partition(":")
        name = f"ort-bins{n}" + (f"-{method}" if method else "")
        jobs.append((name, lambda n=int(n), name=name, method=method or DEFAULT_METHOD: (
            ort_variant(export, calib, args.work, name, t_bins=n, method=method), {})))
    jobs += [(f"ort-smooth{a}", lambda a=a: (ort_variant(export, calib, args.work, f"ort-smooth{a}", smooth=a), {}))
             for a in map(float, filter(None, args.smooth.split(",")))]
    jobs += [(f"modelopt-{m}", lambda m=m: modelopt_variant(export, calib, args.work, m))
             for m in filter(None, args.modelopt.split(","))]
    for name, make in jobs:
        path, facts = make()
        made = json.loads((path / "made.json").read_text()) if (path / "made.json").is_file() else {}
        row = {**made, **facts}
        if facts.get("ort_cpu", "loads") == "loads":
            row.update(evaluate(path, ref, cset, plan, served, refs, seeds, args.repeats))
        report["variants"][name] = row
        print(f"{name:<18} PSNR {row.get('psnr_db') or float('nan'):6.2f} dB  call relL2 "
              f"{row.get('call_rel_l2_mean', float('nan')):.3e}  {row.get('ms_per_call_b2', float('nan')):.2f} ms",
              flush=True)
        write_report(args.json, report)
    write_report(args.json, report, done=True)


if __name__ == "__main__":
    main()
