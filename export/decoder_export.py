"""A pipeline's VAE (diffusers save_pretrained `vae/`, safetensors only) -> decoder.onnx (+ decoder-chunk.onnx).

    AutoencoderKL           per frame, as Latte's decode_latents uses it: z (N, C, h, w) -> (N, 3, H, W)
    AutoencoderKLWan        causal 3D, one latent frame per chunk (diffusers' _decode loop): decoder.onnx
                            decodes the first chunk from no cache, decoder-chunk.onnx every later one,
                            with the causal convolutions' feature cache (feat_cache) as explicit inputs
                            and outputs
    AutoencoderKLCogVideoX  causal 3D, 2 latent frames per chunk (the first takes 2 + F mod 2), its conv_cache
                            flattened into explicit inputs and outputs the same way
    AutoencoderKLLTXVideo   non-causal (LTX 0.9.0, no timestep conditioning): the whole clip in one graph,
                            z (1, C, F, h, w) -> (1, 3, F', H, W); latents_mean/std are its buffers

Why a cache of zeros replaces diffusers' first-chunk states: Wan's causal convolutions pad the past with
zeros, so a zero-filled cache (and its "Rep" marker before the first temporal upsample) computes what
no cache computes; the first chunk's graph emits its states padded that way, so every later chunk is
one graph with fixed-rank inputs. CogVideoX pads the first chunk by repeating its first frame, which is
why its first chunk is a graph of its own too. Both are checked against diffusers' own decode (tests).
Batch: per frame N in 1..max; causal graphs take one video (decode.py loops). Height and width stay
dynamic: spatial tiles at the border are smaller.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from vdit_deploy.decode import CACHE_IN, CACHE_OUT, CAUSAL, EXAMPLE_HW, FRAMES, VIDEO, DecoderMeta, Tiling
from vdit_deploy.errors import VditError
from vdit_deploy.export.variants import DECODER, DECODER_CHUNK, variant_file

# The classes vdit can decode, by the _class_name a vae/config.json names (never imported from metadata).
VAE_CLASSES = ("AutoencoderKL", "AutoencoderKLWan", "AutoencoderKLCogVideoX", "AutoencoderKLLTXVideo")
LAYOUTS = {"AutoencoderKL": FRAMES, "AutoencoderKLLTXVideo": VIDEO}          # the others: CAUSAL


def load_vae(vae_dir) -> tuple[nn.Module, dict, list]:
    """vae/ as save_pretrained writes it -> (module in eval mode, its config, the files hashed), through
    the project's safe loading (sources.py / diffusers_models.py): bounded JSON, safetensors headers
    checked against the class's state dict before anything is allocated, never a pickle."""
    from vdit_deploy.diffusers_models import build, model_class
    from vdit_deploy.files import read_json
    from vdit_deploy.sources import is_diffusers_dir
    from vdit_deploy.weights import diffusers_weight_files

    vae_dir = Path(vae_dir)
    if not is_diffusers_dir(vae_dir):
        raise VditError(f"{vae_dir} is not a diffusers VAE directory (config.json with _class_name); pass the "
                        "pipeline's vae/ folder")
    config = read_json(vae_dir / "config.json", "VAE config", root=vae_dir)
    cls_name = config["_class_name"]
    if cls_name not in VAE_CLASSES:
        raise VditError(f"{vae_dir}: {cls_name} is not a VAE vdit exports (it does {', '.join(VAE_CLASSES)})")
    if config.get("timestep_conditioning"):
        raise VditError(f"{vae_dir}: a timestep-conditioned {cls_name} (LTX 0.9.1+: decode_timestep and "
                        "decode_noise_scale) is not exported yet")
    files, headers = diffusers_weight_files(vae_dir)       # safetensors only: a .bin is refused, never unpickled
    vae = build(model_class(f"diffusers:{cls_name}"), config, vae_dir, files, headers, cls_name)
    return vae.eval(), dict(vae.config), [vae_dir / "config.json", *files]


def latent_scaling(cls_name: str, config: dict, vae=None) -> tuple[list, list]:
    """Per channel (scale, bias) with z = latents * scale + bias, as each pipeline prepares vae.decode:
    Latte / CogVideoX latents / scaling_factor (+ shift_factor where the config has one); Wan latents *
    std + mean; LTX's form (latents * std / scaling_factor + mean) is the same expression."""
    c = int(config.get("z_dim") or config.get("latent_channels"))
    sf = float(config.get("scaling_factor") or 1.0)
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if cls_name == "AutoencoderKLWan":
        sf = 1.0
    if cls_name == "AutoencoderKLLTXVideo":      # its mean and std are weights (buffers), not config
        mean, std = vae.latents_mean.tolist(), vae.latents_std.tolist()
    if mean is not None and std is not None and cls_name != "AutoencoderKL":
        return [float(s) / sf for s in std], [float(m) for m in mean]
    return [1.0 / sf] * c, [float(config.get("shift_factor") or 0.0)] * c


def tiling_of(cls_name: str, vae) -> Tiling:
    """The class's diffusers tiling defaults (output pixels)."""
    if cls_name in ("AutoencoderKLWan", "AutoencoderKLLTXVideo"):
        return Tiling(int(vae.tile_sample_min_height), 1 - vae.tile_sample_stride_height / vae.tile_sample_min_height,
                      "wan")
    if cls_name == "AutoencoderKLCogVideoX":
        return Tiling(int(vae.tile_sample_min_height), float(vae.tile_overlap_factor_height),
                      overlap_w=float(vae.tile_overlap_factor_width))
    return Tiling(int(vae.tile_sample_min_size), float(vae.tile_overlap_factor))


# ---- the graphs' modules ---------------------------------------------------------------------------
class FrameDecoder(nn.Module):
    """AutoencoderKL: z (N, C, h, w) -> (N, 3, H, W), post_quant_conv then the decoder (no tiling inside)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def post_quant(self, z):
        return z if self.vae.post_quant_conv is None else self.vae.post_quant_conv(z)

    def forward(self, z):
        return self.vae.decoder(self.post_quant(z))


class VideoDecoder(FrameDecoder):
    """LTX-Video (decoder_causal False): the whole clip at once, z (1, C, F, h, w) -> (1, 3, F', H, W)."""

    def forward(self, z):
        return self.vae.decoder(z, None)


class WanFirst(nn.Module):
    """The first latent frame, no cache -> (frames (1, 3*p*p, 1, H, W), *cache): diffusers' states after the
    first chunk, each padded to the steady shape with zeros (a "Rep" marker: all zeros)."""

    def __init__(self, vae, layout: list):
        super().__init__()
        self.vae, self.layout = vae, layout       # per used cache slot: (index, channels, frames, spatial factor)

    def forward(self, z):
        vae = self.vae
        feat = [None] * len(vae._feat_map)
        out = vae.decoder(vae.post_quant_conv(z), feat_cache=feat, feat_idx=[0], first_chunk=True)
        b, _, _, h, w = z.shape
        cache = []
        for idx, c, t, s in self.layout:
            state = feat[idx]
            if isinstance(state, str) or state is None:          # "Rep": nothing cached yet
                state = z.new_zeros(b, c, t, h * s, w * s)
            elif state.shape[2] < t:
                state = torch.cat([state.new_zeros(b, c, t - state.shape[2], h * s, w * s), state], 2)
            cache.append(state)
        return (out, *cache)


class WanChunk(nn.Module):
    """A later latent frame: (z (1, C, 1, h, w), *cache) -> (frames (1, 3*p*p, 4, H, W), *cache)."""

    def __init__(self, vae, layout: list):
        super().__init__()
        self.vae, self.layout = vae, layout

    def forward(self, z, *cache):
        vae = self.vae
        feat = [None] * len(vae._feat_map)
        for (idx, *_), state in zip(self.layout, cache):
            feat[idx] = state
        out = vae.decoder(vae.post_quant_conv(z), feat_cache=feat, feat_idx=[0])
        return (out, *(feat[idx] for idx, *_ in self.layout))


def wan_cache_layout(vae, h: int = 4, w: int = 4) -> list:
    """Run diffusers' loop for two latent frames and read the states after the second: the slots used and
    their shapes, (index, channels, frames, output pixels per latent pixel)."""
    vae.clear_cache()
    x = vae.post_quant_conv(torch.zeros(1, vae.config.z_dim, 2, h, w))
    with torch.no_grad():
        for i in range(2):
            vae._conv_idx = [0]
            vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0)
    layout = [(i, int(s.shape[1]), int(s.shape[2]), int(s.shape[3]) // h)
              for i, s in enumerate(vae._feat_map) if isinstance(s, torch.Tensor)]
    vae.clear_cache()
    return layout


class CogFirst(FrameDecoder):
    """CogVideoX's first chunk from no cache (first-frame padding) -> (frames, *flattened conv_cache)."""

    def forward(self, z):
        out, cache = self.vae.decoder(self.post_quant(z), conv_cache=None)
        return (out, *pytree.tree_flatten(cache)[0])


class CogChunk(FrameDecoder):
    """A later chunk: (z, *flattened conv_cache) -> (frames, *conv_cache after it)."""

    def __init__(self, vae, spec):
        super().__init__(vae)
        self.spec = spec

    def forward(self, z, *cache):
        out, cache = self.vae.decoder(self.post_quant(z), conv_cache=pytree.tree_unflatten(list(cache), self.spec))
        return (out, *pytree.tree_flatten(cache)[0])


# ---- export ----------------------------------------------------------------------------------------
def meta_fields(vae, config: dict, tile: int | None = None) -> dict:
    """What a decoder's metadata says about its VAE: layout, latent scaling, ratio, tiling."""
    cls_name = config["_class_name"]
    ratio = int(config.get("scale_factor_spatial") or getattr(vae, "spatial_compression_ratio", None)
                or 2 ** (len(config.get("block_out_channels") or [0, 0]) - 1))
    scale, bias = latent_scaling(cls_name, config, vae)
    tiling = tiling_of(cls_name, vae)
    if tile:
        tiling = Tiling(int(tile), tiling.overlap, tiling.rule, tiling.overlap_w)
    return dict(layout=LAYOUTS.get(cls_name, CAUSAL), scale=scale, bias=bias, ratio=ratio,
                tiling=asdict(tiling),
                vae={"class": cls_name, "config": json.loads(json.dumps(config, default=str))},
                patch=int(config.get("patch_size") or 1))


class TorchDecoder:
    """diffusers' own decode of a pipeline's vae/ (the torch runtime's decoder): decode(latents) -> video."""

    def __init__(self, vae_dir, latent=None, tile: int | None = None):
        self.vae, config, _ = load_vae(vae_dir)
        self.meta = DecoderMeta(kind=DECODER, io={}, checkpoint_sha256="0" * 64, **meta_fields(self.vae, config))
        self.tile = Tiling(**self.meta.tiling).consistent(self.meta.ratio, int(tile)) if tile else 0

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return torch_decode(self.vae, latents, self.meta, self.tile)

    def describe(self) -> str:
        return f"diffusers' {self.meta.vae['class']}"

    def close(self) -> None:
        pass

def _denoiser_frames(out_dir: Path) -> int | None:
    """The latent frame count of the denoiser exported in out_dir, if one is there."""
    from vdit_deploy.export.metadata import read_metadata
    from vdit_deploy.export.variants import DENOISER, find_variant

    found = find_variant(out_dir, DENOISER) if out_dir.is_dir() else None
    return int(read_metadata(found).contract.latent[1]) if found else None


def decoder_graphs(vae, cls_name: str, frames: int, h: int, w: int):
    """-> [(kind, module, example inputs, input names, output names, dynamic axes per input)], temporal."""
    c = int(vae.config.get("z_dim") or vae.config.get("latent_channels"))
    z = lambda f: torch.randn(1, c, f, h, w)
    spatial = {3: "h", 4: "w"}
    if cls_name == "AutoencoderKL":
        return [(DECODER, FrameDecoder(vae), (torch.randn(3, c, h, w),), ["z"], ["frames"],
                 [{0: "n", 2: "h", 3: "w"}])], {}
    if cls_name == "AutoencoderKLLTXVideo":
        with torch.no_grad():
            out = VideoDecoder(vae)(z(frames))
        temporal = {"first": frames, "chunk": 0, "out_first": int(out.shape[2]), "out_chunk": 0}
        return [(DECODER, VideoDecoder(vae), (z(frames),), ["z"], ["frames"], [spatial])], temporal
    if cls_name == "AutoencoderKLWan":
        layout = wan_cache_layout(vae)
        first, chunk = WanFirst(vae, layout), WanChunk(vae, layout)
        f0, fc = 1, 1
        with torch.no_grad():
            outs = first(z(1))
            out_chunk = chunk(z(1), *outs[1:])[0].shape[2]
    else:
        with torch.no_grad():
            f0, fc = (min(frames, 2 + frames % 2) if frames >= 2 else frames), 2
            first = CogFirst(vae)
            outs = first(z(f0))
            spec = pytree.tree_flatten(vae.decoder(z(f0), conv_cache=None)[1])[1]
            chunk = CogChunk(vae, spec)
            out_chunk = chunk(z(fc), *outs[1:])[0].shape[2]
    cache = outs[1:]
    names_out = ["frames", *(f"{CACHE_OUT}{i}" for i in range(len(cache)))]
    cache_axes = [{3: "ch", 4: "cw"} for _ in cache]     # the cache's spatial size follows the tile's
    temporal = {"first": f0, "chunk": fc, "out_first": int(outs[0].shape[2]), "out_chunk": int(out_chunk)}
    return [(DECODER, first, (z(f0),), ["z"], names_out, [spatial]),
            (DECODER_CHUNK, chunk, (z(fc), *cache), ["z", *(f"{CACHE_IN}{i}" for i in range(len(cache)))],
             names_out, [spatial, *cache_axes])], temporal


@contextlib.contextmanager
def _plain_convolutions():
    """CogVideoX's SafeConv3d splits inputs over 2 GB along time (same numbers, less cuDNN workspace),
    deciding on the input's size in Python: a dynamic height and width cannot be traced through that. The
    graph gets the plain Conv3d; the runtime plans its own memory."""
    from diffusers.models.autoencoders import autoencoder_kl_cogvideox as cog

    safe = cog.CogVideoXSafeConv3d.forward
    cog.CogVideoXSafeConv3d.forward = nn.Conv3d.forward
    try:
        yield
    finally:
        cog.CogVideoXSafeConv3d.forward = safe


def _dynamic(axes: list) -> tuple:
    """Each input's dynamic axes -> torch.export's dynamic_shapes in forward's grouping ((z, (*cache)))."""
    shapes = [{i: torch.export.Dim.AUTO for i in spec} or None for spec in axes]
    return (shapes[0],) if len(shapes) == 1 else (shapes[0], tuple(shapes[1:]))


def export_decoder(vae_dir, out_dir, frames: int | None = None, opset: int = 18, tile: int | None = None) -> list[Path]:
    """vae_dir (a pipeline's vae/) -> out_dir/decoder.onnx (+ decoder-chunk.onnx), beside a denoiser export
    or alone. frames: the latent frame count (default: the denoiser's in out_dir; CogVideoX's first chunk
    depends on its parity). tile: the default tile in output pixels (the class's diffusers default)."""
    from vdit_deploy.export.onnx_export import _check_saved, _trace, versions
    from vdit_deploy.files import atomic_path, check_output, sha256_files

    out_dir = Path(out_dir)
    check_output(out_dir / variant_file(DECODER))
    vae, config, files = load_vae(vae_dir)
    frames = frames or _denoiser_frames(out_dir) or 1
    graphs, temporal = decoder_graphs(vae, config["_class_name"], frames, *EXAMPLE_HW)   # sizes no other axis has
    common = meta_fields(vae, config, tile)
    common.update(checkpoint_sha256=sha256_files(files), temporal=temporal, cache=len(graphs[0][4]) - 1,
                  versions=versions())
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind, module, example, inputs, outputs, axes in graphs:
        io = {"inputs": [{"name": n, "shape": list(x.shape), "dtype": "float32"} for n, x in zip(inputs, example)],
              "outputs": [{"name": n, "dtype": "float32"} for n in outputs]}
        meta = DecoderMeta(kind=kind, io=io, **common)
        path = out_dir / variant_file(kind)
        with _plain_convolutions():
            program = _trace(module.eval(), example, inputs, outputs, _dynamic(axes), opset)
        program.model.metadata_props.update({**meta.to_props(), "vdit.vae_path": str(Path(vae_dir).resolve())})
        program.model.producer_name = "vdit-deploy"
        with atomic_path(path) as tmp:
            program.save(str(tmp), external_data=False)
            _check_saved(tmp)
        written.append(path)
    return written


def torch_decode(vae, latents: np.ndarray, meta: DecoderMeta, tile=0) -> np.ndarray:
    """diffusers' own decode of the denoiser's latents, as its pipeline calls it (the reference):
    (B, C, F, h, w) -> (B, 3, F', H, W) clamped to [-1, 1]. tile: (height, width) output pixels (0: untiled)."""
    from vdit_deploy.decode import scale_latents

    z = torch.from_numpy(scale_latents(np.asarray(latents, np.float32), meta))
    cls_name = meta.vae["class"]
    if tile:
        th, tw = (tile, tile) if isinstance(tile, int) else tile
        vae.enable_tiling()
        if cls_name == "AutoencoderKL":         # one square tile size
            assert th == tw, "AutoencoderKL tiles are square"
            vae.tile_sample_min_size, vae.tile_latent_min_size = th, int(th / meta.ratio)
        elif cls_name in ("AutoencoderKLWan", "AutoencoderKLLTXVideo"):
            vae.tile_sample_min_height, vae.tile_sample_min_width = th, tw
            overlap = meta.tiling["overlap"]
            vae.tile_sample_stride_height = int(round(th * (1 - overlap)))
            vae.tile_sample_stride_width = int(round(tw * (1 - overlap)))
        else:
            vae.tile_sample_min_height, vae.tile_sample_min_width = th, tw
            vae.tile_latent_min_height, vae.tile_latent_min_width = int(th / meta.ratio), int(tw / meta.ratio)
    else:
        vae.disable_tiling()
    with torch.no_grad():
        if cls_name == "AutoencoderKL":                      # Latte: frames as a batch
            b, c, f, h, w = z.shape
            out = vae.decode(z.permute(0, 2, 1, 3, 4).flatten(0, 1)).sample
            out = out.reshape(b, f, *out.shape[1:]).permute(0, 2, 1, 3, 4)
        else:
            out = vae.decode(z).sample
    vae.disable_tiling()
    return np.clip(out.numpy(), -1, 1)
