"""Latents -> video through an exported VAE decoder, torch-free (numpy + ONNX Runtime).

An export directory may hold, beside the denoiser's graphs (names in export/variants.py):
    decoder.onnx        frames layout (AutoencoderKL, as Latte uses it): z (N, C, h, w) -> (N, 3, H, W),
                        one latent frame per row;
                        causal layout (AutoencoderKLWan, AutoencoderKLCogVideoX): the first temporal
                        chunk, z (1, C, f0, h, w) -> (frames (1, 3, F0, H, W), *cache_out)
                        video layout (AutoencoderKLLTXVideo, non-causal): the whole clip,
                        z (1, C, F, h, w) -> (1, 3, F', H, W)
    decoder-chunk.onnx  causal layout: every later chunk, (z (1, C, f, h, w), *cache) -> (frames, *cache_out),
                        the causal convolutions' feature cache as explicit inputs and outputs, so that a
                        runtime decodes chunk by chunk in the memory of one chunk
Their metadata (DecoderMeta: vdit.kind "decoder"/"decoder-chunk", vdit.decoder, digest) says how to
scale the denoiser's latents (z = latents * scale + bias per channel, from the VAE config's
scaling_factor, shift_factor, latents_mean/latents_std) and how diffusers tiles the class.

Spatial tiling follows diffusers' tiled_decode: tiles of `tile` latent pixels every `stride` latent
pixels, each decoded through all its chunks, then each tile blended linearly with the one above and the
one to its left over `blend` output pixels (blend_v / blend_h) and cropped to `stride` output pixels.
The tile size (output pixels) comes from the deployment profile (runtimes/profiles.py `vae_tile`) or
--tile; without one the decode is untiled, as diffusers decodes by default.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.export.variants import DECODER, DECODER_CHUNK, DECODER_KINDS, FP32, find_variant

FRAMES, CAUSAL, VIDEO = "frames", "causal", "video"
DIGESTED = ("vdit.kind", "vdit.decoder", "vdit.vae", "vdit.io", "vdit.checkpoint_sha256")
CACHE_IN, CACHE_OUT = "cache_", "cache_out_"
EXAMPLE_HW = (5, 6)        # the latent size export_decoder traces at (no other axis has it): names the dynamic axes


@dataclass(frozen=True)
class Tiling:
    """diffusers' tiled_decode of one class, in output pixels: `tile` the tile size, `overlap` the fraction
    of it blended with the neighbour (`overlap_w` across the width where the class differs: CogVideoX
    blends 1/6 of the height, 1/5 of the width). rule "kl" (AutoencoderKL, CogVideoX): latent stride
    int(tile_latent * (1 - overlap)), blend int(tile * overlap), crop tile - blend; rule "wan": stride
    tile*(1-overlap) in output pixels, latent stride stride // ratio, blend tile - stride."""
    tile: int
    overlap: float
    rule: str = "kl"
    overlap_w: float | None = None

    def axes(self) -> tuple[float, float]:
        return self.overlap, self.overlap if self.overlap_w is None else self.overlap_w

    def consistent(self, ratio: int, tile: int) -> tuple[int, int]:
        """Per axis (height, width), the largest tile <= `tile` (at least one unit) whose tiles meet exactly:
        the latent stride times the ratio equals the cropped tile. diffusers' tiled_decode assumes it; at
        other sizes it repeats pixels (AutoencoderKL at 6 px and ratio 2 decodes 12 rows to 14)."""
        def one(overlap):
            ok = lambda t: (lambda p: p[0] > 0 and p[1] > 0 and p[1] * ratio == p[3])(self._plan(ratio, t, overlap))
            fitting = [t for t in range(ratio, max(int(tile), ratio) + 1, ratio) if ok(t)]
            return fitting[-1] if fitting else next(t for t in range(ratio, 1000 * ratio, ratio) if ok(t))
        return tuple(one(o) for o in self.axes())

    def plan(self, ratio: int, tiles: tuple[int, int]) -> tuple[tuple, tuple]:
        """-> per axis (tile_latent, stride_latent, blend, crop) for consistent tiles (height, width) px."""
        return tuple(self._plan(ratio, t, o) for t, o in zip(tiles, self.axes()))

    def _plan(self, ratio: int, t: int, overlap: float) -> tuple[int, int, int, int]:
        if self.rule == "wan":
            crop = int(round(t * (1 - overlap)))
            return t // ratio, crop // ratio, t - crop, crop
        tl = int(t / ratio)
        blend = int(t * overlap)
        return tl, int(tl * (1 - overlap)), blend, t - blend


@dataclass(frozen=True)
class DecoderMeta:
    kind: str                        # decoder | decoder-chunk
    layout: str                      # frames | causal
    vae: dict                        # {"class": "AutoencoderKL", "config": {...}}
    scale: list                      # per latent channel: z = latents * scale + bias
    bias: list
    ratio: int                       # output pixels per latent pixel (after unpatchify)
    tiling: dict                     # Tiling fields
    io: dict
    checkpoint_sha256: str
    temporal: dict = field(default_factory=dict)   # causal: {"first": f0, "chunk": f, "out_first", "out_chunk"}
    patch: int = 1                   # Wan 2.2: the decoder's output is patched (unpatchify after blending)
    cache: int = 0                   # causal: number of cache tensors
    precision: str = FP32
    versions: dict = field(default_factory=dict)

    def decoder_props(self) -> dict:
        return {k: getattr(self, k) for k in ("layout", "scale", "bias", "ratio", "tiling", "temporal", "patch",
                                              "cache")}

    def to_props(self) -> dict[str, str]:
        props = {"vdit.kind": self.kind, "vdit.decoder": json.dumps(self.decoder_props(), sort_keys=True),
                 "vdit.vae": json.dumps(self.vae, sort_keys=True), "vdit.io": json.dumps(self.io),
                 "vdit.checkpoint_sha256": self.checkpoint_sha256, "vdit.precision": self.precision,
                 "vdit.versions": json.dumps(self.versions, sort_keys=True)}
        return {**props, "vdit.digest": _digest(props)}

    @classmethod
    def from_props(cls, props: dict, source: str) -> "DecoderMeta":
        from vdit_deploy import validate as v

        missing = [k for k in (*DIGESTED, "vdit.precision", "vdit.digest") if k not in props]
        if missing:
            raise VditError(f"{source} is not a vdit decoder graph (metadata lacks {', '.join(missing)})")
        if props["vdit.digest"] != _digest(props):
            raise VditError(f"{source}: its vdit metadata was edited after export; re-export the decoder")
        where = f"{source} metadata"
        try:
            dec, vae = json.loads(props["vdit.decoder"]), json.loads(props["vdit.vae"])
            io, versions = json.loads(props["vdit.io"]), json.loads(props.get("vdit.versions", "{}"))
        except (ValueError, RecursionError) as e:
            raise VditError(f"{where}: not valid JSON: {str(e)[:100]}") from None
        v.obj(dec, "vdit.decoder", required=("layout", "scale", "bias", "ratio", "tiling", "temporal", "patch",
                                             "cache"), where=where)
        v.obj(vae, "vdit.vae", required=("class", "config"), where=where)
        meta = cls(kind=v.string(props["vdit.kind"], "vdit.kind", DECODER_KINDS, where), vae=vae, io=io,
                   checkpoint_sha256=v.sha256_hex(props["vdit.checkpoint_sha256"], "vdit.checkpoint_sha256", where),
                   precision=props["vdit.precision"], versions=versions, **dec)
        v.string(meta.layout, "decoder layout", (FRAMES, CAUSAL, VIDEO), where)
        if len(meta.scale) != len(meta.bias) or not meta.scale:
            v.fail(where, "decoder scale and bias must be lists of one number per latent channel")
        Tiling(**meta.tiling)
        return meta

    @property
    def channels(self) -> int:
        return len(self.scale)

    def frames_out(self, f: int) -> int:
        """Output frames for f latent frames."""
        if self.layout == FRAMES:
            return f
        t = self.temporal
        if self.layout == VIDEO:
            return t["out_first"]
        chunks = (f - t["first"]) // t["chunk"]
        return t["out_first"] + chunks * t["out_chunk"]

    def check_latent(self, latent) -> None:
        """Before sampling: the denoiser's latents (C, F, H, W) are ones this decoder takes."""
        c, f = int(latent[0]), int(latent[1])
        if c != self.channels:
            raise VditError(f"the decoder takes {self.channels}-channel latents, the denoiser makes {c}; "
                            "export the decoder of this model's own VAE")
        t = self.temporal
        if self.layout == VIDEO and f != t["first"]:
            raise VditError(f"the decoder was exported for {t['first']} latent frames, the denoiser makes {f}; "
                            f"re-export the decoder with --frames {f}")
        if self.layout == CAUSAL and (f < t["first"] or (f - t["first"]) % t["chunk"]):
            raise VditError(f"the decoder was exported for {t['first']} + k * {t['chunk']} latent frames, the "
                            f"denoiser makes {f}; re-export the decoder with --frames {f}")


def _digest(props: dict) -> str:
    return hashlib.sha256("\n".join(f"{k}={props[k]}" for k in DIGESTED).encode()).hexdigest()


def read_decoder_meta(path: str | Path) -> DecoderMeta:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise VditError(f"{path} is not an ONNX model: {type(e).__name__}") from None
    return DecoderMeta.from_props({p.key: p.value for p in model.metadata_props}, str(path))


def find_decoder(export_dir, precision: str = FP32) -> Path | None:
    """decoder.onnx (or its precision variant) in an export directory, or None."""
    if export_dir is None or not Path(export_dir).is_dir():
        return None
    return find_variant(export_dir, DECODER, precision)


# ---- the host-side arithmetic (numpy, op for op diffusers') -----------------------------------------
def scale_latents(latents: np.ndarray, meta: DecoderMeta) -> np.ndarray:
    """(B, C, F, H, W) denoiser latents -> the decoder's z (what the pipeline does before vae.decode)."""
    shape = (1, -1, 1, 1, 1)
    return (latents * np.asarray(meta.scale, np.float32).reshape(shape)
            + np.asarray(meta.bias, np.float32).reshape(shape)).astype(np.float32)


def blend_v(a: np.ndarray, b: np.ndarray, extent: int) -> np.ndarray:
    """diffusers' blend_v on the H axis (-2): b's first rows fade in over a's last rows (b changed in place)."""
    extent = min(a.shape[-2], b.shape[-2], extent)
    for y in range(extent):
        b[..., y, :] = a[..., -extent + y, :] * (1 - y / extent) + b[..., y, :] * (y / extent)
    return b


def blend_h(a: np.ndarray, b: np.ndarray, extent: int) -> np.ndarray:
    extent = min(a.shape[-1], b.shape[-1], extent)
    for x in range(extent):
        b[..., x] = a[..., -extent + x] * (1 - x / extent) + b[..., x] * (x / extent)
    return b


def tiled(decode_tile, z: np.ndarray, plans: tuple, out_h: int, out_w: int) -> np.ndarray:
    """diffusers' tiled_decode: z (..., h, w) -> (..., out_h, out_w) from decode_tile(z tile) -> output tile.
    plans: per axis (tile_latent, stride_latent, blend, crop) (Tiling.plan)."""
    (th, sh, bh, ch), (tw, sw, bw, cw) = plans
    h, w = z.shape[-2:]
    rows = [[decode_tile(z[..., i:i + th, j:j + tw]) for j in range(0, w, sw)] for i in range(0, h, sh)]
    out_rows = []
    for i, row in enumerate(rows):
        out_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = blend_v(rows[i - 1][j], tile, bh)
            if j > 0:
                tile = blend_h(row[j - 1], tile, bw)
            out_row.append(tile[..., :ch, :cw])
        out_rows.append(np.concatenate(out_row, axis=-1))
    return np.concatenate(out_rows, axis=-2)[..., :out_h, :out_w]


def unpatchify(x: np.ndarray, p: int) -> np.ndarray:
    """Wan 2.2's unpatchify: (B, C*p*p, F, H, W) -> (B, C, F, H*p, W*p), channels ordered (c, r, q)."""
    if p == 1:
        return x
    b, cpp, f, h, w = x.shape
    c = cpp // (p * p)
    x = x.reshape(b, c, p, p, f, h, w)                       # (b, c, r, q, f, h, w)
    return x.transpose(0, 1, 4, 5, 3, 6, 2).reshape(b, c, f, h * p, w * p)


# ---- running the graphs ------------------------------------------------------------------------------
class Decoder:
    """decoder.onnx (and decoder-chunk.onnx) in ONNX Runtime: decode(latents) -> (B, 3, F', H', W') in [-1, 1]
    (clamped as the pipeline's video processor does). tile: output pixels per tile, blended as the class's
    diffusers tiled_decode does (None or 0: untiled, as diffusers decodes by default)."""

    def __init__(self, export_dir, precision: str = FP32, providers=None, tile: int | None = None, threads=None):
        path = find_decoder(export_dir, precision)
        if path is None:
            raise VditError(f"{export_dir} has no decoder graph ({precision}); run `vdit export-decoder`")
        self.meta = read_decoder_meta(path)
        self.files = [path]
        self.first = self.session(path, providers, threads)
        self.chunk = None
        if self.meta.layout == CAUSAL:
            chunk = find_variant(export_dir, DECODER_CHUNK, precision)
            if chunk is None:
                raise VditError(f"{export_dir} has {path.name} but no {DECODER_CHUNK} graph; re-export the decoder")
            meta = read_decoder_meta(chunk)
            if meta.decoder_props() != self.meta.decoder_props() or meta.checkpoint_sha256 != self.meta.checkpoint_sha256:
                raise VditError(f"{path.name} and {chunk.name} come from different decoder exports; re-export")
            self.chunk = self.session(chunk, providers, threads)
            self.files.append(chunk)
        self.tiling = Tiling(**self.meta.tiling)
        # (height, width) px: tiles that meet exactly; 0: untiled
        self.tile = self.tiling.consistent(self.meta.ratio, int(tile)) if tile else 0

    def session(self, file: Path, providers=None, threads=None):
        """One graph's ONNX Runtime session (--threads as the denoiser's); a subclass runs it elsewhere."""
        import onnxruntime as ort

        from vdit_deploy.runtimes.ort_runtime import resolve_providers
        from vdit_deploy.threads import session_options

        options = session_options()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            return ort.InferenceSession(str(file), options, providers=resolve_providers(providers))
        except Exception as e:
            raise VditError(f"ONNX Runtime cannot load {file}: {str(e).splitlines()[0]}") from None

    def describe(self) -> str:
        return f"{self.files[0].name} (ONNX Runtime)"

    def close(self) -> None:
        """Sessions need no closing; a TensorRT decoder frees its device memory here."""

    def _run(self, session, feeds: dict) -> list:
        dtypes = {i.name: np.float16 if i.type == "tensor(float16)" else np.float32 for i in session.get_inputs()}
        outs = session.run(None, {k: np.ascontiguousarray(v, dtypes[k]) for k, v in feeds.items()})
        return [np.asarray(o, np.float32) for o in outs]

    def decode_z(self, z: np.ndarray) -> np.ndarray:
        """One tile of already-scaled z, untiled: frames layout (B, C, F, h, w) per frame; causal chunk by chunk."""
        if self.meta.layout == FRAMES:
            b, c, f, h, w = z.shape
            rows = z.transpose(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
            out = self._run(self.first, {"z": rows})[0]                   # (B*F, 3, H, W)
            return out.reshape(b, f, *out.shape[1:]).transpose(0, 2, 1, 3, 4)
        if self.meta.layout == VIDEO:                                       # the whole clip, one video a call
            return np.concatenate([self._run(self.first, {"z": video[None]})[0] for video in z])
        t = self.meta.temporal
        videos = []
        for video in z:                                                     # one video at a time (batch 1)
            first, *cache = self._run(self.first, {"z": video[None, :, :t["first"]]})
            parts = [first]
            for s in range(t["first"], video.shape[1], t["chunk"]):
                feeds = {"z": video[None, :, s:s + t["chunk"]], **{f"{CACHE_IN}{i}": c for i, c in enumerate(cache)}}
                out, *cache = self._run(self.chunk, feeds)
                parts.append(out)
            videos.append(np.concatenate(parts, axis=2))
        return np.concatenate(videos)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(B, C, F, h, w) denoiser latents -> (B, 3, F', H, W) video."""
        latents = np.asarray(latents, np.float32)
        self.meta.check_latent(latents.shape[1:])
        z = scale_latents(latents, self.meta)
        h, w = z.shape[-2:]
        ratio = self.meta.ratio // self.meta.patch                          # the graph's own output pixels
        p = self.meta.patch
        plans = self.tiling.plan(self.meta.ratio, self.tile) if self.tile else None
        if plans is not None and p > 1:                                     # diffusers tiles in patched pixels
            plans = tuple((tl, stride, blend // p, crop // p) for tl, stride, blend, crop in plans)
        if plans is None or (h <= plans[0][0] and w <= plans[1][0]):         # diffusers tiles only larger latents
            out = self.decode_z(z)
        else:
            out = tiled(self.decode_z, z, plans, h * ratio, w * ratio)
        out = unpatchify(out, self.meta.patch)
        return np.clip(out, -1.0, 1.0)


def describe_decoder(path) -> str:
    meta = read_decoder_meta(path)
    return (f"{path}  ({meta.kind}, {meta.precision}) {meta.vae['class']} {meta.layout}: {meta.channels} latent "
            f"channels, x{meta.ratio} spatial, temporal {meta.temporal or 'per frame'}, tiling {meta.tiling}, "
            f"z = latents * scale + bias ({asdict(meta)['scale'][:4]}..., {meta.bias[:4]}...)")

