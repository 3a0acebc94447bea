"""Prove an exported VAE decoder decodes what diffusers decodes, and make its fp16 variant.

verify_decoder decodes random latents of the denoiser's shape (or a small one) through every decoder
precision in the directory, untiled and in spatial tiles, and compares each with diffusers' own
vae.decode of the same latents (tiled the same way): relative L2 of the video, fp32 held to the
tolerance on its worst call, fp16 to PRECISION_TOLERANCE's mean, as the denoiser's graphs are.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vdit_deploy.decode import CAUSAL, Decoder, find_decoder, read_decoder_meta
from vdit_deploy.errors import VditError
from vdit_deploy.export.variants import DECODER_KINDS, FP16, FP32, find_variant, variant_file


def check_latent_shape(export_dir: Path, meta) -> tuple:
    """(C, F, h, w) to verify on: the denoiser's latents when it is exported beside the decoder."""
    from vdit_deploy.export.decoder_export import _denoiser_frames
    from vdit_deploy.export.metadata import read_metadata
    from vdit_deploy.export.variants import DENOISER

    found = find_variant(export_dir, DENOISER)
    if found is not None and _denoiser_frames(export_dir):
        return tuple(int(d) for d in read_metadata(found).contract.latent)
    t = meta.temporal
    return (meta.channels, t["first"] + t["chunk"] if meta.layout == CAUSAL else 2, 6, 5)


def verify_decoder(export_dir, vae_dir=None, tolerance: float = 1e-4, seed: int = 0) -> list:
    """-> verify.Comparison rows, one per decoder precision and tiling (untiled, tiled)."""
    from vdit_deploy.export.decoder_export import load_vae, torch_decode
    from vdit_deploy.export.verify import PRECISION_TOLERANCE, Comparison

    export_dir = Path(export_dir)
    first = find_decoder(export_dir)
    if first is None:
        return []
    import onnx

    props = {p.key: p.value for p in onnx.load(str(first), load_external_data=False).metadata_props}
    vae_dir = Path(vae_dir or props.get("vdit.vae_path", ""))
    meta = read_decoder_meta(first)
    if not (vae_dir / "config.json").is_file():
        raise VditError(f"{first}: its VAE {vae_dir} is not there; pass the pipeline's vae/ directory")
    vae, _, files = load_vae(vae_dir)
    from vdit_deploy.files import sha256_files

    if sha256_files(files) != meta.checkpoint_sha256:
        raise VditError(f"{vae_dir} is not the VAE {first.name} was exported from (sha256 differs)")
    latent = check_latent_shape(export_dir, meta)
    rng = np.random.default_rng(seed)
    latents = [rng.standard_normal((1, *latent), dtype=np.float32) for _ in range(2)]
    # a tile of about half the video's size (at least 2 latent pixels): every tiled call blends
    from vdit_deploy.decode import Tiling

    tile = max(Tiling(**meta.tiling).consistent(meta.ratio, max(2, min(latent[2:]) // 2 + 1) * meta.ratio))
    rows = []
    for precision in (FP32, FP16):
        if find_decoder(export_dir, precision) is None:
            continue
        for t in (0, tile):
            dec = Decoder(export_dir, precision, providers=["cpu"], tile=t)
            name = variant_file(DECODER_KINDS[0], precision) + (f" tile {dec.tile[0]}" if t else "")
            row = Comparison(name, "video", tolerance if precision == FP32 else PRECISION_TOLERANCE[FP16],
                             "worst" if precision == FP32 else "mean")
            for x in latents:
                row.add(dec.decode(x), torch_decode(vae, x, dec.meta, dec.tile))
            rows.append(row)
    return rows


def convert_decoder_fp16(export_dir) -> list[Path]:
    """decoder.onnx (+ decoder-chunk.onnx) -> *.fp16.onnx (float32 I/O; the normalisations' reductions and
    Softmax kept fp32), refused if it makes inf/NaN on random latents."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from vdit_deploy.calibration.fp16 import FP32_OPS, drop_round_trips
    from vdit_deploy.files import atomic_path, check_output

    export_dir = Path(export_dir)
    sources = [p for k in DECODER_KINDS if (p := find_variant(export_dir, k)) is not None]
    if not sources:
        raise VditError(f"{export_dir} has no {variant_file(DECODER_KINDS[0])}; run `vdit export-decoder` first")
    written = []
    for src in sources:
        out = src.with_name(variant_file(read_decoder_meta(src).kind, FP16))
        check_output(out)
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True,
                                         op_block_list=DEFAULT_OP_BLOCK_LIST + list(FP32_OPS))
        model = drop_round_trips(model)
        props = {p.key: p.value for p in model.metadata_props}
        props["vdit.precision"] = FP16                        # not digested: the file name carries it
        del model.metadata_props[:]
        for k, v in props.items():
            model.metadata_props.add(key=k, value=v)
        with atomic_path(out) as tmp:
            onnx.save(model, str(tmp))
        written.append(out)
    meta = read_decoder_meta(sources[0])
    c, f, h, w = check_latent_shape(export_dir, meta)
    video = Decoder(export_dir, FP16, providers=["cpu"]).decode(
        np.random.default_rng(0).standard_normal((1, c, f, h, w), dtype=np.float32) * 2)
    if not np.isfinite(video).all():
        for p in written:
            p.unlink()
        raise VditError("the fp16 decoder makes inf/NaN on random latents; not written")
    return written
