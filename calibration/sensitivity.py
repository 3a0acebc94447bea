"""Per-layer INT8 sensitivity: quantize one layer group at a time, measure the eps error it adds.

    vdit calibrate sensitivity EXPORT_DIR --calib CALIB_DIR

Each compute layer (a Linear / Conv module, graph.layer_groups) is quantized alone, everything else
stays fp32, and the calibration set is run through it: the eps relative L2 against fp32 is the error
that layer alone costs. The ranking shows why DEFAULT_SENSITIVE layers are kept in float. Groups with
no weight the mode quantizes are left out: the attention cores (activation x activation matmuls stay
float in both modes) and, for dynamic INT8, Gemms (no integer Gemm kernel: int8_dynamic.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vdit_deploy.calibration.graph import check_patterns, layer_groups, matches
from vdit_deploy.export.metadata import DENOISER, find_onnx, read_metadata
from vdit_deploy.files import temp_dir
from vdit_deploy.progress import bar, note


@dataclass
class LayerError:
    layer: str
    nodes: int
    eps_rel_l2: float
    kept_fp: bool          # matched by the keep-in-float patterns (DEFAULT_SENSITIVE)


def sensitivity(export_dir, calib_dir, mode: str = "dynamic", method: str = "minmax",
                layers: str | None = None, keep_fp=None, progress=None) -> list[LayerError]:
    """Errors per layer group, largest first. layers: a regex restricting which groups are tried.
    progress: True for a bar per layer group on stderr (progress.py), or a callable given each LayerError."""
    import onnx

    from vdit_deploy.calibration.collect import load_calibration_set, run_onnx
    from vdit_deploy.calibration.int8 import DEFAULT_SENSITIVE, quantize_int8
    from vdit_deploy.calibration.int8_dynamic import quantizable
    from vdit_deploy.metrics import rel_l2

    keep_fp = DEFAULT_SENSITIVE if keep_fp is None else keep_fp
    check_patterns([*keep_fp, *([layers] if layers else [])])
    src = find_onnx(export_dir, DENOISER)
    meta = read_metadata(src)
    cset = load_calibration_set(calib_dir, meta.checkpoint_sha256, meta.contract)
    model = onnx.load(str(src), load_external_data=False)
    by_name = {n.name: n for n in model.graph.node}
    weights = {i.name for i in model.graph.initializer}
    has_weight = (lambda nodes: quantizable(model, nodes)) if mode == "dynamic" else \
        (lambda nodes: [n for n in nodes if by_name[n].input[1:2] and by_name[n].input[1] in weights])
    groups = {k: v for k, v in layer_groups(model).items()
              if (layers is None or re.search(layers, k)) and has_weight(v)}
    if progress is True:
        note(f"sensitivity: {len(groups)} layer groups, each quantized alone and run on {len(cset)} calibration "
             "rows (minutes for a small model: one quantization and one pass over the set per group)")
    ref = run_onnx(src, cset)
    out = []
    with temp_dir(src.with_name("sensitivity")) as tmp:
        for i, (layer, nodes) in enumerate(bar(groups.items(), show=progress is True, desc="sensitivity",
                                               unit="layer")):
            path = Path(tmp) / f"{i}.onnx"
            quantize_int8(export_dir, calib_dir, mode=mode, method=method, keep_fp=(),
                          only=[f"^{re.escape(n)}$" for n in nodes], out=path)
            err = rel_l2(run_onnx(path, cset), ref)
            out.append(LayerError(layer, len(nodes), err, any(matches(by_name[n], keep_fp) for n in nodes)))
            if callable(progress):
                progress(out[-1])
    return sorted(out, key=lambda e: -e.eps_rel_l2)


def table(errors: list[LayerError]) -> str:
    lines = [f"{'layer':<48} {'nodes':>5} {'eps rel L2':>11}  kept in float"]
    for e in errors:
        lines.append(f"{e.layer:<48} {e.nodes:>5} {e.eps_rel_l2:>11.3e}  {'yes' if e.kept_fp else ''}")
    return "\n".join(lines)
