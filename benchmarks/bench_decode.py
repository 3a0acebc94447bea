"""Tiled against untiled VAE decode through ONNX Runtime (CPU): peak memory, time, and the tiling's error
next to diffusers' own tiling error on the same latents.

    python benchmarks/bench_decode.py [--out benchmarks/cpu/decode-DATE.json]
    python benchmarks/bench_decode.py --trt [--out benchmarks/gpu/decode-trt.json]     (benchmarks/gpu_check.sh)

An AutoencoderKL with random weights, an SD-style decoder at half width (block_out_channels 64-128-256-256,
x8 spatial, 4 latent channels), decoding 2 frames of 64x64 latents (512x512 pixels) untiled and in
256-pixel tiles (the orin-nano profile's vae_tile). Each decode runs in a fresh process and its peak
resident memory is read from /proc/self/statm every 5 ms (vdit_deploy.generate's meter), minus the
process's memory just before the decode (session created, latents drawn).
--trt (a GPU with TensorRT): the same decoder's `vdit build` engines at fp32 and fp16 (runtimes/trt_decoder.py),
untiled and tiled, each timed (1 warm-up, median of 3) and checked against diffusers' decode of the same latents.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("/tmp/vdit-bench-decode")
LATENT = (4, 2, 64, 64)


def child(export: str, tile: int) -> None:
    import numpy as np

    from vdit_deploy.decode import Decoder
    from vdit_deploy.generate import GenerateReport, rss_bytes

    dec = Decoder(export, providers=["cpu"], tile=tile)
    x = np.random.default_rng(0).standard_normal((1, *LATENT), dtype=np.float32)
    report = GenerateReport()
    base = rss_bytes()
    with report.stage("decode"):
        video = dec.decode(x)
    np.save(ROOT / f"video-{tile}.npy", video)
    s = report.stages[0]
    print(json.dumps({"tile": tile, "seconds": s.seconds, "peak_mb": s.peak_bytes / 1e6,
                      "peak_over_start_mb": (s.peak_bytes - base) / 1e6}))


def trt_rows(export: Path, vae, tile: int) -> list[dict]:
    """TensorRT decoder rows: per precision and tile (0: untiled), median seconds and max abs / relative L2
    against diffusers' own decode (tiled the same way)."""
    import numpy as np

    from vdit_deploy.decode import read_decoder_meta
    from vdit_deploy.export.decoder_export import torch_decode
    from vdit_deploy.runtimes.trt_build import decoder_engines
    from vdit_deploy.runtimes.trt_decoder import TrtDecoder
    from vdit_deploy.runtimes.trt_network import BuildOptions

    meta = read_decoder_meta(export / "decoder.onnx")
    x = np.random.default_rng(0).standard_normal((1, *LATENT), dtype=np.float32)
    refs = {t: torch_decode(vae, x, meta, t) for t in (0, tile)}
    rows = []
    for precision in ("fp32", "fp16"):
        start = time.perf_counter()
        built = decoder_engines(export, precision, LATENT, None, BuildOptions())
        build_s = time.perf_counter() - start
        for t in (0, tile):
            dec = TrtDecoder(export, precision, tile=t or None)
            dec.decode(x)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                video = dec.decode(x)
                times.append(time.perf_counter() - start)
            dec.close()
            ref = refs[t]
            rows.append({"precision": precision, "tile": t, "seconds_median": sorted(times)[1],
                         "build_s": round(build_s, 1), "engine": built[0].engine.path.name,
                         "max_abs_vs_diffusers": float(np.abs(video - ref).max()),
                         "rel_l2_vs_diffusers": float(np.linalg.norm(video - ref) / np.linalg.norm(ref))})
            print(rows[-1])
    return rows


def main():
    import diffusers
    import numpy as np
    import onnxruntime
    import torch

    from vdit_deploy.export.decoder_export import export_decoder, load_vae, torch_decode

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--trt", action="store_true", help="also the TensorRT decoder (a GPU with TensorRT)")
    args = parser.parse_args()
    vae_dir, export = ROOT / "vae", ROOT / "export"
    if not (export / "decoder.onnx").is_file():
        torch.manual_seed(0)
        vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(64, 128, 256, 256),
                                      latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512)
        vae.save_pretrained(vae_dir)
        start = time.perf_counter()
        export_decoder(vae_dir, export)
        print(f"export {time.perf_counter() - start:.1f} s")
    runs = {}
    for tile in (0, args.tile):
        run = subprocess.run([sys.executable, __file__, "--child", str(export), str(tile)], capture_output=True,
                             text=True, check=True)
        runs[tile] = json.loads(run.stdout.strip().splitlines()[-1])
        print(runs[tile])
    vae, _, _ = load_vae(vae_dir)
    from vdit_deploy.decode import read_decoder_meta

    meta = read_decoder_meta(export / "decoder.onnx")
    x = np.random.default_rng(0).standard_normal((1, *LATENT), dtype=np.float32)
    ref_full, ref_tiled = torch_decode(vae, x, meta, 0), torch_decode(vae, x, meta, args.tile)
    full, tiled = np.load(ROOT / "video-0.npy"), np.load(ROOT / f"video-{args.tile}.npy")
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
    result = {
        "what": "AutoencoderKL decoder (random weights, block_out_channels 64-128-256-256), 2 frames of 64x64 latents "
                "-> 512x512, ONNX Runtime CPU, each decode in a fresh process",
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
        "load_average": open("/proc/loadavg").read().split()[:3],
        "params": sum(p.numel() for p in vae.decoder.parameters()) + sum(p.numel() for p in vae.post_quant_conv.parameters()),
        "untiled": runs[0], "tiled": runs[args.tile],
        "ort_vs_diffusers_untiled_max_abs": float(np.abs(full - ref_full).max()),
        "ort_vs_diffusers_tiled_max_abs": float(np.abs(tiled - ref_tiled).max()),
        "tiled_vs_untiled_rel_l2_ort": rel(tiled, full), "tiled_vs_untiled_rel_l2_diffusers": rel(ref_tiled, ref_full),
        "tiled_vs_untiled_max_abs_ort": float(np.abs(tiled - full).max()),
    }
    if args.trt:
        import tensorrt

        result["tensorrt"] = tensorrt.__version__
        result["trt"] = trt_rows(export, vae, args.tile)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]))
    else:
        main()
