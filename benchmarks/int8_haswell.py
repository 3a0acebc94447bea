"""The CI guard (tests/test_int8_guard.py) on a CPU without VNNI, emulated: qemu's Haswell (AVX2, no
AVX-512, no VNNI), where ONNX Runtime's MLAS takes its saturating VPMADDUBSW u8 x s8 kernel.

    python benchmarks/int8_haswell.py [--dir DIR] [--qemu qemu-x86_64]

Natively: export the shipped checkpoint, collect the guard's calibration set (default sampler, seed 0)
and make the fp16 graph and two INT8 sets, the guard's default options with the types of
  old/  --target vnni: what every CPU got before issue 25 (s8 weights, full range, no reduce_range)
  new/  --target avx2: what `calibrate int8` picks on this CPU now (7-bit weights, reduce_range)
then, under `qemu-x86_64 -cpu Haswell`, the guard's measurement (calibration/report.video_psnr: final
videos of the default sampler, every class, against fp32 on the same emulated CPU) for each set.
The guard passes at fp16 >= 40 dB and INT8 (dynamic, Q/DQ) >= 30 dB.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRECISIONS = ["fp16", "int8", "int8-qdq"]


def prepare(root: Path) -> dict:
    from vdit_deploy.calibration.collect import collect
    from vdit_deploy.calibration.fp16 import convert_fp16
    from vdit_deploy.calibration.int8 import quantize_int8, variant_path
    from vdit_deploy.checkpoint import SHIPPED
    from vdit_deploy.export.onnx_export import export_checkpoint

    base = export_checkpoint(SHIPPED, root / "export")
    calib = collect(base, root / "calib", seeds=range(1))
    convert_fp16(base)
    dirs = {}
    for name, target in (("old", "vnni"), ("new", "avx2")):
        export = shutil.copytree(base, root / name)
        quantize_int8(export, target=target)
        quantize_int8(export, calib, mode="qdq", target=target, out=variant_path(export, "qdq"))
        dirs[name] = str(export)
    return dirs


def measure(export: str) -> dict:
    from vdit_deploy.calibration.report import video_psnr
    from vdit_deploy.runtimes.cpu_isa import host_isa

    start = time.perf_counter()
    psnr = video_psnr(export, PRECISIONS)
    return {"isa": host_isa(), "psnr_db": psnr, "seconds": round(time.perf_counter() - start, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--qemu", default="qemu-x86_64")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)     # the emulated half
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    root = args.dir or Path(tempfile.mkdtemp(prefix="int8-haswell-"))
    dirs = prepare(root)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = {}
    for name, export in dirs.items():
        cmd = [args.qemu, "-cpu", "Haswell", sys.executable, __file__, "--measure", export]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
        native = measure(export)
        rows[name]["native"] = native
        print(name, json.dumps(rows[name]), flush=True)
    for name, row in rows.items():
        cells = "  ".join(f"{p} {row['psnr_db'][p]:6.2f} dB (native {row['native']['isa']}: "
                          f"{row['native']['psnr_db'][p]:.2f})" for p in PRECISIONS)
        print(f"{name} (emulated {row['isa']}): {cells}")


if __name__ == "__main__":
    main()
