"""An ONNX graph's external data, checked before anything loads or copies the graph.

ONNX keeps large tensors outside the .onnx file, each naming a `location` relative to the graph. A
graph is untrusted input: a location of ../../../../etc/passwd would make onnx.load, ONNX Runtime,
or a copy into a Triton repository read (and ship) a file outside the export. vdit writes external
data only as `<graph>.onnx.data` beside the graph, so that is the one location accepted, for every
tensor (initializers, Constant nodes, subgraphs), its bytes inside that file, which must be a regular
file in the export directory.
"""
from __future__ import annotations

from pathlib import Path

from vdit_deploy.errors import VditError
from vdit_deploy.files import open_regular


def _tensors(model):
    from onnx.external_data_helper import _get_all_tensors   # every TensorProto, subgraphs included

    return _get_all_tensors(model)


def check_external_data(model, path: Path) -> None:
    """model: the graph loaded without its external data (onnx.load(..., load_external_data=False))."""
    from onnx.external_data_helper import uses_external_data

    path = Path(path)
    data_name = path.name + ".data"
    data_size = None
    for tensor in _tensors(model):
        if not uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if location != data_name:
            raise VditError(f"{path}: tensor {tensor.name[:60]!r} keeps its data in {location[:80]!r}; a vdit graph "
                            f"keeps external data only in {data_name} beside it (refused: it could read any file)")
        if data_size is None:
            f, data_size = open_regular(path.parent / data_name, path.parent, "external data file")
            f.close()
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", data_size))
        except ValueError:
            raise VditError(f"{path}: tensor {tensor.name[:60]!r} has a non-integer external data offset or "
                            "length") from None
        if offset < 0 or length < 0 or offset + length > data_size:
            raise VditError(f"{path}: tensor {tensor.name[:60]!r} reads bytes {offset}..{offset + length} of "
                            f"{data_name}, which has {data_size} (truncated or not this graph's data)")
