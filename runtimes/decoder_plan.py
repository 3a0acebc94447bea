"""The VAE decoder's memory beside the denoiser's in `vdit plan` (torch-free).

decoder.onnx is sized at one spatial tile (the profile's vae_tile, else the metadata's diffusers tile),
as GraphSize sizes a denoiser: weights from the float initializers at the engine precision's bytes,
activations the largest operator's inputs + outputs from ONNX shape inference at that tile (a lower
bound: the live skip tensors are not counted), plus the cache a causal decoder carries between chunks
and the decoded video the host holds. The denoiser's engine and the decoder's are both resident in one
`vdit generate` process, so the plan adds them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vdit_deploy.decode import CACHE_OUT, find_decoder, read_decoder_meta
from vdit_deploy.errors import VditError


def decoder_rows(export_dir, precision: str, tile: int | None, latent) -> dict[str, tuple[int, int]]:
    """name -> (bytes at run time, bytes while building), as MemoryPlan.rows; {} without a decoder."""
    import onnx

    from vdit_deploy.runtimes.profiles import ACTIVATION_BYTES, WEIGHT_BYTES

    path = find_decoder(export_dir) if export_dir is not None and Path(export_dir).is_dir() else None
    if path is None:
        return {}
    meta = read_decoder_meta(path)
    c, f, h, w = (int(d) for d in latent)
    from vdit_deploy.decode import Tiling

    tile_h, tile_w = Tiling(**meta.tiling).consistent(meta.ratio, int(tile or meta.tiling["tile"]))
    th, tw = min(h, tile_h // meta.ratio), min(w, tile_w // meta.ratio)
    tile = tile_h
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    params = sum(int(np.prod(i.dims)) for i in graph.initializer if i.data_type in floats)
    z = graph.input[0].type.tensor_type.shape.dim          # (N, C, h, w) or (1, C, f0, h, w)
    frames_in = f if meta.layout in ("frames", "video") else meta.temporal["first"]
    for d, size in zip(z, [frames_in if meta.layout == "frames" else 1, c,
                           *([] if meta.layout == "frames" else [frames_in]), th, tw]):
        d.Clear()
        d.dim_value = size
    del graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    except Exception as e:
        raise VditError(f"{path}: ONNX shape inference failed ({str(e).splitlines()[0][:200]})") from None
    known = {}
    for v in [*inferred.input, *inferred.value_info, *inferred.output]:
        dims = v.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            known[v.name] = int(np.prod([d.dim_value for d in dims]))
    weights = {i.name for i in graph.initializer}
    largest = max((sum(known.get(n, 0) for n in [*node.input, *node.output] if n not in weights)
                   for node in inferred.node), default=0)
    cache = sum(known.get(o.name, 0) for o in inferred.output if o.name.startswith(CACHE_OUT))
    video = 4 * 3 * meta.frames_out(f) * h * meta.ratio * w * meta.ratio
    wbytes = params * WEIGHT_BYTES[precision]
    act = largest * ACTIVATION_BYTES[precision]
    rows = {f"decoder weights ({precision})": (wbytes, wbytes),
            f"decoder activations (tile {tile} px)": (act, 0),
            "decoder cache + decoded video (fp32)": (4 * cache + video, 0)}
    return rows
