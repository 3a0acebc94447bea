"""Load on a live Triton server: throughput (videos/s) and latency p50/p99 at concurrency 1, 2, 4, 8.

The shipped checkpoint is exported and written as a `serve-export --backend python` repository, served by
nvidia-pytriton's tritonserver on loopback (vdit_deploy/serve.py, free ports), and driven over gRPC by
`c` client threads, each sending one-video requests (the export's default sampler, UniPC 15 steps,
guidance 2, a new seed each) back to back for --seconds per level after one warm-up request per thread.
The levels run in --rounds rounds (1, 2, 4, 8, then again), so that a change in what else runs on the
machine falls on every level alike; a level's throughput is its videos over its wall time, summed over
rounds, and its latencies are pooled. The denoiser's mean batch per execution (Triton's statistics)
shows how much the dynamic batcher merged; the denoiser alone at each batch (same runtime, in this
process, after the server stopped) shows what batching can win on this CPU at best. Every request has
a deadline; no round starts after --budget seconds. The machine's load (os.getloadavg, others' jobs
included) is recorded around each level.

    python benchmarks/bench_serve.py                        # -> benchmarks/cpu/serve-DATE.json + a table
    python benchmarks/bench_serve.py --levels 1,8 --seconds 10 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from vdit_deploy.checkpoint import SHIPPED
from vdit_deploy.compare import machine_info
from vdit_deploy.export.triton import write_triton_repo
from vdit_deploy.serve import TritonServer

DEADLINE = 120.0


def one_video(client, grpcclient, label: int, seed: int) -> np.ndarray:
    y = grpcclient.InferInput("y", [1], "INT32")
    y.set_data_from_numpy(np.array([label], np.int32))
    s = grpcclient.InferInput("seed", [1], "INT64")
    s.set_data_from_numpy(np.array([seed], np.int64))
    return client.infer("vdit_sampler", [y, s], client_timeout=DEADLINE).as_numpy("video")


def denoiser_counts(client) -> tuple[int, int]:
    stats = client.get_inference_statistics("vdit_denoiser", as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def level(address: str, concurrency: int, seconds: float, seed0: int) -> dict:
    """`concurrency` threads, each with its own gRPC client, requesting back to back for `seconds`."""
    import tritonclient.grpc as grpcclient

    clients = [grpcclient.InferenceServerClient(address) for _ in range(concurrency)]
    for i, c in enumerate(clients):     # warm-up: one request each, not timed
        one_video(c, grpcclient, i % 4, seed0 + i)
    latencies, errors, lock = [], [], threading.Lock()
    counts0 = denoiser_counts(clients[0])
    load0 = os.getloadavg()[0]
    start = time.perf_counter()
    stop_at = start + seconds

    def run(i, c):
        n = 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                one_video(c, grpcclient, i % 4, seed0 + 1000 * (i + 1) + n)
            except Exception as e:
                with lock:
                    errors.append(str(e)[:200])
                return
            with lock:
                latencies.append(time.perf_counter() - t0)
            n += 1
    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + DEADLINE)
    wall = time.perf_counter() - start
    samples, executions = (b - a for a, b in zip(counts0, denoiser_counts(clients[0])))
    for c in clients:
        c.close()
    return {"concurrency": concurrency, "latencies": latencies, "wall_s": wall, "samples": samples,
            "executions": executions, "load_1m": [round(load0, 2), round(os.getloadavg()[0], 2)], "errors": errors}


def summary(runs: list[dict]) -> dict:
    """One level's rounds -> its row."""
    lat = sorted(x for r in runs for x in r["latencies"])
    wall, samples, executions = (sum(r[k] for r in runs) for k in ("wall_s", "samples", "executions"))
    loads = [x for r in runs for x in r["load_1m"]]
    return {"concurrency": runs[0]["concurrency"], "rounds": len(runs), "videos": len(lat), "wall_s": round(wall, 3),
            "videos_per_s": round(len(lat) / wall, 4),
            "videos_per_s_by_round": [round(len(r["latencies"]) / r["wall_s"], 4) for r in runs],
            "latency_p50_s": round(statistics.median(lat), 4) if lat else None,
            "latency_p99_s": round(float(np.percentile(lat, 99)), 4) if lat else None,
            "denoiser_calls": samples // 2, "denoiser_executions": executions,
            "mean_batch_per_execution": round(samples / executions, 2) if executions else None,
            "load_1m_min": min(loads), "load_1m_max": max(loads), "errors": [e for r in runs for e in r["errors"]]}


def denoiser_scaling(export: Path, batches, repeats: int = 20) -> dict:
    """What batching can win on this CPU at best: the denoiser's median ms per call at each batch (the
    server's runtime and settings, in this process), and per-video cost at the largest batch relative to
    batch 2 (one video with guidance). Near 1: the CPU already ran batch 2 at full width."""
    from common import median_seconds
    from vdit_deploy.runtimes.ort_runtime import OrtRuntime

    rt = OrtRuntime(export / "denoiser.onnx", providers=["cpu"], spin=False)
    rng = np.random.default_rng(0)
    ms = {}
    for b in batches:
        x = rng.standard_normal((b, *rt.contract.latent), dtype=np.float32)
        t = np.full(b, 500, np.float32)
        y = {"y": np.zeros(b, np.int32)}
        ms[b] = round(1000 * median_seconds(lambda: rt.denoise(x, t, y), repeats), 3)
    lo, hi = min(batches), max(batches)
    return {"ms_per_call": ms, "per_video_gain_at_max_batch": round((ms[lo] / lo) / (ms[hi] / hi), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,2,4,8", help="Concurrency levels.")
    ap.add_argument("--seconds", type=float, default=10.0, help="Timed load per level and round.")
    ap.add_argument("--rounds", type=int, default=3, help="Rounds over the levels.")
    ap.add_argument("--budget", type=float, default=900.0, help="Stop starting levels after this many seconds.")
    ap.add_argument("--work", type=Path, default=None, help="Keep the export and repository here (default: temp).")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default: benchmarks/cpu/serve-DATE.json).")
    args = ap.parse_args()
    levels = [int(v) for v in args.levels.split(",")]
    began = time.monotonic()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    out = args.out or Path(__file__).parent / "cpu" / f"serve-{date}.json"
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        export = work / "export"
        if not (export / "denoiser.onnx").is_file():
            from vdit_deploy.export.onnx_export import export_checkpoint
            export_checkpoint(SHIPPED, export)
        repo = work / "repo"
        write_triton_repo(export, repo, backend="python", sampler_instances=max(levels))
        runs = {c: [] for c in levels}
        with TritonServer(repo) as server:
            address = server.addresses.url("grpc")
            for n in range(args.rounds):
                if time.monotonic() - began > args.budget:
                    print(f"budget of {args.budget:.0f} s spent: {args.rounds - n} round(s) not run", file=sys.stderr)
                    break
                for c in levels:
                    r = level(address, c, args.seconds, seed0=10000 * n + 100 * c)
                    runs[c].append(r)
                    print(f"round {n + 1} c={c}: {len(r['latencies']) / r['wall_s']:.3f} videos/s, batch "
                          f"{r['samples'] / max(r['executions'], 1):.2f}, load {r['load_1m']}", flush=True)
        rows = [summary(runs[c]) for c in levels if runs[c]]
        batches = sorted({2, 4, 8, 2 * max(levels)})
        scaling = denoiser_scaling(export, batches)   # the server is stopped: the cores are all this run's
    base = rows[0]["videos_per_s"] if rows else None
    for r in rows:
        r["vs_c1"] = round(r["videos_per_s"] / base, 3) if base else None
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    result = {"date": date, "what": "bench_serve.py: vdit_sampler over gRPC on loopback, shipped checkpoint, "
              "one video per request, unipc 15 steps, guidance 2; denoiser: --backend python (ORT CPU, default "
              "threads, no spinning), dynamic batching (2 ms queue delay)", "seconds_per_level": args.seconds,
              "rounds": args.rounds,
              "machine": machine_info(), "uptime_after": uptime, "rows": rows, "denoiser_scaling": scaling}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n| concurrency | videos | videos/s | vs c=1 | by round | p50 s | p99 s | denoiser rows/exec | load 1m |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['videos']} | {r['videos_per_s']:.3f} | {r['vs_c1']:.2f}x | "
              f"{', '.join(f'{v:.2f}' for v in r['videos_per_s_by_round'])} | {r['latency_p50_s']} | "
              f"{r['latency_p99_s']} | {r['mean_batch_per_execution']} | {r['load_1m_min']}-{r['load_1m_max']} |")
    print(f"\ndenoiser alone: {scaling}\n{uptime}\nwrote {out}")


if __name__ == "__main__":
    main()
