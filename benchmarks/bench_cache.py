"""Step caching on ONNX Runtime CPU: a threshold sweep of fbcache and teacache against uncached sampling,
same noise, in one run (vdit_deploy/compare/cache_rows.py), on
  - the shipped checkpoint (vdit_deploy/assets/tiny, trained), labels 0..3 as one batch of 4;
  - a tiny random diffusers Latte (4 layers, 2 heads x 8, 4x2x8x8 latents, text width 32), 2 random prompts;
  - the shipped flow-matching checkpoint (vdit_deploy/assets/tiny-flow, v-prediction), labels 0..3.
tiny and latte sample with UniPC, flow with its default sampler (flow euler), 50 steps, guidance 2.
Each model is exported with --cache-split 1; teacache's polynomial is fitted (`vdit calibrate cache`) on a
calibration set of the same sampler with other seeds (100, 101) than the ones scored (0, 1).

    python benchmarks/bench_cache.py [--models tiny,latte,flow] [--repeats 3] [--out benchmarks/cache]

Writes OUT/cache-DATE.json (rows + conditions), OUT/cache-DATE.md (tables) and OUT/<model>-sweep.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

FBCACHE = (0.02, 0.04, 0.06, 0.08, 0.1, 0.15)
TEACACHE = (0.02, 0.05, 0.1, 0.2, 0.3)


def conditions() -> dict:
    import onnx
    import onnxruntime
    import torch

    flags = sorted(set(subprocess.run(["grep", "-o", r"avx512_vnni\|avx512_bf16\|avx512_fp16\|avx_vnni\|avx2",
                                       "/proc/cpuinfo"], capture_output=True, text=True).stdout.split()))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu, "cpu_flags": flags,
            "cores": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "threads": 1}


def tiny_latte(path: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import save_tiny_latte

    if not (path / "config.json").is_file():
        save_tiny_latte(path, num_layers=4)
    return path


def prepare(model_dir: Path, work: Path, sampler: str | None, cond=None) -> Path:
    from vdit_deploy.calibration.cache_fit import fit_cache
    from vdit_deploy.calibration.collect import collect
    from vdit_deploy.export.onnx_export import export_checkpoint

    export = work / "export"
    if not (export / "step-head.onnx").is_file():
        kw = {"seq": (1, 16)} if cond is not None else {}
        export_checkpoint(model_dir, export, batch=(1, 4), cache_split=1, **kw)
    if not (work / "calib" / "manifest.json").is_file():
        collect(export, work / "calib", sampler, 50, seeds=[100, 101], timesteps=50, cond=cond)
    fit_cache(export, work / "calib")
    return export


def run(name: str, export: Path, sampler: str | None, repeats: int, out: Path, cond=None) -> list[dict]:
    from vdit_deploy.compare.artifacts import Target
    from vdit_deploy.compare.cache_rows import measure_cache, plot_sweep
    from vdit_deploy.runtimes import open_runtime

    settings = [{"mode": "fbcache", "threshold": t, "warmup": 2, "max_skips": 3} for t in FBCACHE] + \
               [{"mode": "teacache", "threshold": t, "warmup": 2, "max_skips": 3} for t in TEACACHE]
    rows = measure_cache(Target("ort", "fp32").label, lambda: open_runtime("ort", export, threads=1),
                         4 if cond is None else 2, [0, 1], sampler, 50, 0.0, 2.0, repeats, cond, settings)
    for r in rows:
        r["model"] = name
    plot_sweep(rows, out / f"{name}-sweep.png")
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,latte")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "cache")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vdit-bench-cache"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    from vdit_deploy.checkpoint import SHIPPED, SHIPPED_FLOW
    from vdit_deploy.compare.cache_rows import format_cache_table

    args.out.mkdir(parents=True, exist_ok=True)
    report = {"conditions_start": conditions(), "rows": []}
    for name in args.models.split(","):
        if name in ("tiny", "flow"):
            sampler = "unipc" if name == "tiny" else None                   # None: the model's default
            model = SHIPPED if name == "tiny" else SHIPPED_FLOW
            rows = run(name, prepare(model, args.work / name, sampler), sampler, args.repeats, args.out)
        elif name == "latte":
            rng = np.random.default_rng(7)
            prompts = {"encoder_hidden_states": rng.standard_normal((2, 16, 32)).astype(np.float32)}
            model = tiny_latte(args.work / "latte-model")
            rows = run("latte", prepare(model, args.work / "latte", "unipc", prompts), "unipc", args.repeats, args.out,
                       prompts)
        else:
            parser.error(f"--models takes tiny, latte, flow; got {name!r}")
        report["rows"] += rows
        print(f"## {name}\n{format_cache_table(rows)}\n", flush=True)
    report["conditions_end"] = conditions()
    stamp = report["conditions_start"]["date"][:10]
    (args.out / f"cache-{stamp}.json").write_text(json.dumps(report, indent=1) + "\n")
    md = [f"# step caching sweep ({report['conditions_start']['date']})", "",
          f"conditions: {json.dumps(report['conditions_start'])}", f"at the end: load {report['conditions_end']['load_average']}", ""]
    for name in args.models.split(","):
        rows = [r for r in report["rows"] if r["model"] == name]
        md += [f"## {name} ({rows[0]['sampler']}, {rows[0]['steps']} steps)" if rows else f"## {name}", "", format_cache_table(rows), "",
               f"![{name}]({name}-sweep.png)", ""]
    (args.out / f"cache-{stamp}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
