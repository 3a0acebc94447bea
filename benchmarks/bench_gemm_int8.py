"""The ceiling on INT8 speed-ups in ONNX Runtime on this CPU: one GEMM, fp32 against its integer kernels.

    python benchmarks/bench_gemm_int8.py [--repeats 10] [--json benchmarks/cpu/gemm-int8-DATE.json]

For each shape (M tokens x K in x N out: the S preset's MLP and attention projections at batch 1 and
the shipped model's at batch 2) one single-node graph per kernel, one thread, median of --repeats:
    fp32        MatMul (MLAS's SGEMM)
    u8s8        MatMulInteger, u8 activations x s8 weights (the dynamic graph's kernel: VNNI vpdpbusd,
                or on AVX2 vpmaddubsw pairs summed in 16 bits)
    u8u8        MatMulInteger, u8 x u8 (widened to 16 bits first)
    dynamic     DynamicQuantizeLinear + MatMulInteger + the scale Muls, the chain a dynamic INT8 graph
                has per layer (ONNX Runtime fuses it into DynamicQuantizeMatMul)
A whole INT8 graph cannot beat fp32 by more than the u8s8 / fp32 ratio of its GEMMs (Amdahl: the
attention cores, norms and the layers kept in float run as before). The CPU's /proc/cpuinfo flags,
model and load are recorded with the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime
from pathlib import Path

import numpy as np

SHAPES = {"S mlp (2048x384x1536)": (2048, 384, 1536), "S attention proj (2048x384x384)": (2048, 384, 384),
          "tiny mlp, batch 2 (1536x128x512)": (1536, 128, 512)}


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    field = lambda key: next((line.split(":", 1)[1].strip() for line in info.splitlines()
                              if line.split(":")[0].strip() == key), "")
    flags = [f for f in field("flags").split() if f.startswith(("avx", "amx", "fma", "f16c"))]
    return {"model": field("model name"), "family": field("cpu family"), "model_id": field("model"),
            "flags": flags, "machine": platform.machine(), "load": list(os.getloadavg())}


def graph(kind: str, k: int, n: int, rng):
    from onnx import TensorProto, helper, numpy_helper

    f32, u8, i32 = TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT32
    if kind == "fp32":
        w = numpy_helper.from_array((rng.standard_normal((k, n)) * 0.05).astype(np.float32), "w")
        return [helper.make_node("MatMul", ["a", "w"], ["y"])], [w], f32, f32
    weights = (rng.integers(-64, 65, (k, n)).astype(np.int8) if kind != "u8u8"
               else rng.integers(0, 128, (k, n)).astype(np.uint8))
    inits = [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.zeros(n, weights.dtype), "w_zp")]
    if kind == "dynamic":
        inits.append(numpy_helper.from_array(np.full(n, 1e-3, np.float32), "w_scale"))
        nodes = [helper.make_node("DynamicQuantizeLinear", ["a"], ["aq", "a_scale", "a_zp"]),
                 helper.make_node("MatMulInteger", ["aq", "w", "a_zp", "w_zp"], ["yi"]),
                 helper.make_node("Cast", ["yi"], ["yf"], to=f32),
                 helper.make_node("Mul", ["a_scale", "w_scale"], ["s"]),
                 helper.make_node("Mul", ["yf", "s"], ["y"])]
        return nodes, inits, f32, f32
    inits.append(numpy_helper.from_array(np.array(128, np.uint8), "a_zp"))
    return [helper.make_node("MatMulInteger", ["a", "w", "a_zp", "w_zp"], ["y"])], inits, u8, i32


def time_kernel(kind: str, m: int, k: int, n: int, repeats: int) -> float:
    import onnxruntime as ort
    from onnx import helper

    rng = np.random.default_rng(0)
    nodes, inits, a_type, y_type = graph(kind, k, n, rng)
    model = helper.make_model(helper.make_graph(nodes, kind, [helper.make_tensor_value_info("a", a_type, [m, k])],
                                                [helper.make_tensor_value_info("y", y_type, None)], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = (rng.integers(0, 256, (m, k)).astype(np.uint8) if a_type == helper.np_dtype_to_tensor_dtype(np.dtype(np.uint8))
         else rng.standard_normal((m, k)).astype(np.float32))
    session.run(None, {"a": a})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"a": a})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    import onnxruntime

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = {"date": datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": cpu(),
              "onnxruntime": onnxruntime.__version__, "threads": 1, "rows": []}
    print(f"{report['cpu']['model']} (family {report['cpu']['family']} model {report['cpu']['model_id']}), "
          f"flags {' '.join(report['cpu']['flags'])}, load {report['cpu']['load'][0]:.2f}, "
          f"onnxruntime {onnxruntime.__version__}, 1 thread")
    print(f"| shape | kernel | median ms | GOP/s | vs fp32 |\n|---|---|---:|---:|---:|")
    for label, (m, k, n) in SHAPES.items():
        base = None
        for kind in ("fp32", "u8s8", "u8u8", "dynamic"):
            seconds = time_kernel(kind, m, k, n, args.repeats)
            base = base or seconds
            row = {"shape": label, "kernel": kind, "ms": round(seconds * 1e3, 2),
                   "gops": round(2 * m * k * n / seconds / 1e9, 1), "vs_fp32": round(base / seconds, 2)}
            report["rows"].append(row)
            print(f"| {label} | {kind} | {row['ms']} | {row['gops']} | {row['vs_fp32']:.2f}x |")
    report["load_after"] = list(os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
