"""The safetensors weights of a model directory: which files they are, what their headers promise, and
their tensors. The weights hash, the size estimate, `vdit info` and the loader all take their files
from here, so they read the same bytes (an index naming real.safetensors beside a decoy shard cannot
make the hash cover the decoy while the loader reads the other).

Model directories are untrusted input: a file is read only when it is a regular file (not a FIFO,
device or a link to one) inside the directory, and its header only when it describes tensors that
fit in the file (a forged header cannot claim 10^18 parameters). Torch-free, except load_tensors.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from vdit_deploy import validate as v
from vdit_deploy.errors import VditError
from vdit_deploy.files import open_regular, read_json

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
SINGLE = f"{DIFFUSERS_WEIGHTS}.safetensors"
INDEX = f"{DIFFUSERS_WEIGHTS}.safetensors.index.json"
HEADER_LIMIT = 100 << 20         # safetensors' own limit on the JSON header
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
            "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(file: Path, root: Path | None = None) -> dict[str, TensorInfo]:
    """A safetensors file's header, checked against the file: 8-byte length, JSON object, each tensor's
    dtype, shape and data offsets inside the file and of the size its shape and dtype make."""
    file = Path(file)
    f, size = open_regular(file, root, "safetensors file")
    with f:
        if size < 8:
            raise VditError(f"{file} is {size} bytes: not a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > HEADER_LIMIT:
            raise VditError(f"{file}: its safetensors header claims {n:,} bytes in a {size:,}-byte file "
                            "(truncated or not safetensors)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise VditError(f"{file}: its safetensors header is not valid JSON (corrupt or not safetensors)") from None
    where, data = str(file), size - 8 - n
    v.obj(header, "safetensors header", where=where, extra_ok=True)
    tensors = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        v.obj(t, f"tensor {v.show(name)}", required=("dtype", "shape", "data_offsets"), where=where)
        dtype = v.string(t["dtype"], f"the dtype of {v.show(name)}", tuple(ITEMSIZE), where)
        shape = tuple(v.int_list(t["shape"], f"the shape of {v.show(name)}", lo=0, where=where))
        lo, hi = v.int_list(t["data_offsets"], f"the data offsets of {v.show(name)}", 2, 0, where=where)
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        if not lo <= hi <= data or hi - lo != nbytes:
            v.fail(where, f"tensor {v.show(name)} ({dtype} {list(shape)}: {nbytes:,} bytes) has data offsets "
                          f"{lo}..{hi} in {data:,} bytes of data: a forged or corrupt header")
        tensors[name] = TensorInfo(dtype, shape, nbytes)
    return tensors


def _index_files(path: Path) -> dict[str, str]:
    """The index's weight_map (tensor -> shard file name), each name a file in this directory."""
    index = read_json(path / INDEX, "safetensors index", root=path)
    where = str(path / INDEX)
    v.obj(index, "safetensors index", required=("weight_map",), where=where, extra_ok=True)
    weight_map = v.obj(index["weight_map"], "weight_map", where=where, extra_ok=True)
    if not weight_map:
        v.fail(where, "weight_map names no tensors")
    for key, name in weight_map.items():
        v.string(name, f"the file of {v.show(key)}", where=where)
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\.safetensors", name):
            v.fail(where, f"{v.show(key)} is mapped to {v.show(name)}: a shard must be a .safetensors file name "
                          "in this directory (no paths)")
    return weight_map


def diffusers_weight_files(path: Path) -> tuple[list[Path], dict[str, dict[str, TensorInfo]]]:
    """A diffusers directory's weight files, as from_pretrained would choose them: the shards its
    index names (no others), or the one diffusion_pytorch_model.safetensors. -> (files, the
    index when there is one first; {file name: its checked header}). Refused, one line: no weights, a
    pickle only, shards without an index, both layouts, an index that disagrees with the shards."""
    path = Path(path)
    has_index, has_single = (path / INDEX).exists(), (path / SINGLE).exists()
    if has_index and has_single:
        raise VditError(f"{path} has both {SINGLE} and {INDEX}: which weights are the model's is ambiguous; "
                        "remove one")
    if has_single:
        return [path / SINGLE], {SINGLE: read_header(path / SINGLE, path)}
    if not has_index:
        shards = sorted(p.name for p in path.glob(f"{DIFFUSERS_WEIGHTS}*.safetensors"))
        pickled = sorted(p.name for p in path.glob(f"{DIFFUSERS_WEIGHTS}*.bin"))
        hint = (f" (it has {', '.join(shards[:3])} but no {INDEX} naming them)" if shards else
                f" (it has {', '.join(pickled[:3])}: pickle files are never loaded; re-save with safe_serialization)"
                if pickled else "")
        raise VditError(f"{path} has no {SINGLE}{hint}")
    weight_map = _index_files(path)
    names = sorted(set(weight_map.values()))
    headers = {name: read_header(path / name, path) for name in names}
    for name, header in headers.items():
        extra = sorted(k for k in header if weight_map.get(k) != name)
        if extra:
            raise VditError(f"{path / name} holds {len(extra)} tensor(s) its index maps elsewhere or not at all "
                            f"({v.show(extra[0])}): the index does not describe these shards")
    missing = sorted(k for k, name in weight_map.items() if k not in headers[name])
    if missing:
        raise VditError(f"{path / INDEX} maps {len(missing)} tensor(s) to shards that lack them "
                        f"({v.show(missing[0])} in {weight_map[missing[0]]})")
    return [path / INDEX, *(path / n for n in names)], headers


def all_tensors(headers: dict[str, dict[str, TensorInfo]]) -> dict[str, TensorInfo]:
    return {k: t for header in headers.values() for k, t in header.items()}


def check_layer_counts(config: dict, tensors: dict, where: str) -> None:
    """Every num_layers / num_<x>_layers count in a diffusers config must be the length of some indexed
    module list in the weights (transformer_blocks.0 .. N-1): checked before the model is built, so
    num_layers 10^6 is refused at once instead of building a million blocks, and -1 or a count the
    weights do not have is refused rather than run with no blocks or random ones."""
    lengths: dict[str, int] = {}
    for key in tensors:
        m = re.match(r"^((?:[A-Za-z_]\w*\.)*?[A-Za-z_]\w*)\.(\d+)\.", key)   # the outermost list only
        if m:
            lengths[m.group(1)] = max(lengths.get(m.group(1), 0), int(m.group(2)) + 1)
    found = sorted(set(lengths.values()))
    for name, value in config.items():
        if isinstance(name, str) and re.fullmatch(r"num(_\w+)?_layers", name) and value is not None:
            v.integer(value, name, 0, v.INT32_MAX, where)
            if value and value not in found:
                v.fail(where, f"{name} = {value}, but the weights hold layer lists of length "
                              f"{', '.join(map(str, found[:8])) or 'none'}: the config does not match its weights")


def load_tensors(files: list[Path], headers: dict[str, dict[str, TensorInfo]]) -> dict:
    """The checked files' tensors as torch tensors (read through safetensors: nothing is unpickled)."""
    from safetensors import SafetensorError, safe_open

    state = {}
    for file in files:
        if file.name not in headers:
            continue
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in headers[file.name]:
                    state[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise VditError(f"{file} is not a readable safetensors file: {' '.join(str(e).split())[:200]}") from None
    return state
