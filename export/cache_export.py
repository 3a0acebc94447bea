"""Step caching's split graphs, written beside denoiser.onnx and step.onnx by `vdit export --cache-split K`.

    denoiser-head.onnx  (x_t, t, *cond, residual_ref, modulated_ref, tail_residual)
                        -> hidden, *ctx, residual, modulated, stats (4,), out      (rows: any call's)
    denoiser-tail.onnx  (hidden, *ctx) -> out, tail_residual
    step-head.onnx      (x_t, t, *cond, *null_cond, residual_ref, modulated_ref, tail_residual, guidance,
                        coefs, noise, x0_prev, corr) -> hidden, *ctx, residual, modulated, stats,
                        x_prev, x0, corr_next                 (the 2B cond + null rows inside, as step.onnx)
    step-tail.onnx      (x_t, hidden, *ctx, guidance, coefs, noise, x0_prev, corr)
                        -> x_prev, x0, corr_next, tail_residual

The heads' out / x_prev is a skipped step's result (the cached tail residual in place of the tail),
so a skipped step runs one graph, a full one runs both and takes the tail's. hidden, ctx and the
cache tensors have the 2B rows of a guided call in the step graphs ("rows"). The step graphs are
composed from the denoiser ones (Concat for the 2B rows, GuidedUpdate traced alone), as step.onnx is.
Each graph's metadata records the split (vdit.cache: blocks K of depth N, the ctx names, the error
of head + tail against denoiser.onnx measured at export, refused above CACHE_TOLERANCE).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.export.variants import DENOISER, DENOISER_HEAD, DENOISER_TAIL, STEP_HEAD, STEP_TAIL, variant_file

CACHE_TOLERANCE = 1e-5          # head + tail against the full graph, relative L2 (float32 reassociation only)
HEAD_OUTPUTS = ("hidden", "residual", "modulated", "stats")
REF_INPUTS = ("residual_ref", "modulated_ref", "tail_residual")


def ctx_inputs(cache: dict) -> tuple:
    return tuple(f"ctx_{name}" for name in cache["ctx"])


def head_inputs(contract, step: bool) -> tuple:
    from vdit_deploy.export.metadata import NULL_PREFIX
    from vdit_deploy.export.tracing import STEP_TAIL as UPDATE

    null = tuple(NULL_PREFIX + n for n in contract.names) if step else ()
    return ("x_t", "t", *contract.names, *null, *REF_INPUTS, *(UPDATE if step else ()))


def head_outputs(cache: dict, step: bool) -> tuple:
    from vdit_deploy.export.tracing import STEP_OUTPUTS

    return ("hidden", *ctx_inputs(cache), "residual", "modulated", "stats", *(STEP_OUTPUTS if step else ("out",)))


def tail_inputs(cache: dict, step: bool) -> tuple:
    from vdit_deploy.export.tracing import STEP_TAIL as UPDATE

    return ("x_t", "hidden", *ctx_inputs(cache), *UPDATE) if step else ("hidden", *ctx_inputs(cache))


def tail_outputs(step: bool) -> tuple:
    from vdit_deploy.export.tracing import STEP_OUTPUTS

    return (*(STEP_OUTPUTS if step else ("out",)), "tail_residual")


def _spec(name, shape, layout):
    return {"name": name, "shape": list(shape), "dtype": "float32", "layout": layout}


def _io(kind: str, base_io: dict, shapes: dict, cache: dict, rows: str) -> dict:
    """I/O specs from the full graphs' (denoiser / step) and the traced shapes of the split tensors."""
    named = {s["name"]: s for s in base_io["inputs"] + base_io["outputs"]}
    split = {name: _spec(name, [rows, *shape[1:]], what) for name, shape, what in (
        ("hidden", shapes["hidden"], f"the hidden state after block {cache['blocks']}"),
        *((c, shapes[c], "what the later blocks read besides the hidden state") for c in ctx_inputs(cache)),
        ("residual", shapes["hidden"], "hidden minus the embedded input: fbcache's probe"),
        ("modulated", shapes["modulated"], "the first block's timestep-modulated input: teacache's probe"),
        ("residual_ref", shapes["hidden"], "residual of the last full step (zeros before one)"),
        ("modulated_ref", shapes["modulated"], "modulated of the previous step (zeros before one)"),
        ("tail_residual", shapes["hidden"], "the tail's residual cached at the last full step (zeros before one)"))}
    split["stats"] = _spec("stats", [4], "step_cache.STATS: L1 change and size of residual and modulated")
    step = kind in (STEP_HEAD, STEP_TAIL)
    names = ((head_inputs(base_io["contract"], step), head_outputs(cache, step)) if kind in (DENOISER_HEAD, STEP_HEAD)
             else (tail_inputs(cache, step), tail_outputs(step)))
    return {"inputs": [split.get(n) or named[n] for n in names[0]],
            "outputs": [split.get(n) or named[n] for n in names[1]]}


def export_cache_graphs(source, out_dir: Path, k: int, den_range: tuple, step_range: tuple, opset: int,
                        common: dict, den_io: dict, step_io: dict, external_data) -> dict:
    """Trace the head and tail of `source` cut after block k at the denoiser's batch range, compose the
    step versions, check head + tail against out_dir's denoiser.onnx -> the vdit.cache record."""
    import torch

    from vdit_deploy.cache_split import split
    from vdit_deploy.contract import BATCH
    from vdit_deploy.export.metadata import ExportMetadata
    from vdit_deploy.export.tracing import _export, example_inputs, fixed_sizes, traced_size

    contract = source.contract
    head, tail = split(source.module, k, len(contract.names))

    def run(n):
        example = example_inputs(contract, n)
        with torch.no_grad():
            h, *rest = head(*example, *[torch.zeros(1)] * 3)
            ctx, modulated = rest[:-4], rest[-3]
            tail_res = tail(h, *ctx)[1]
        return example, h, ctx, modulated, tail_res

    taken = {d for t in run(2)[1:4] for x in (t if isinstance(t, (tuple, list)) else (t,)) for d in x.shape[1:]}
    n = traced_size(den_range[0], den_range[1], fixed_sizes(contract) | taken)   # no size shared with an axis
    example, h, ctx, modulated, tail_res = run(n)
    refs = (h * 0.9, modulated * 1.1, tail_res * 0.5)      # distinct tensors: export ties aliased inputs
    cache = {"blocks": k, "depth": head.blocks.depth, "ctx": list(head.blocks.ctx_names), "error": 0.0}
    shapes = {"hidden": tuple(h.shape), "modulated": tuple(modulated.shape),
              **{c: tuple(t.shape) for c, t in zip(ctx_inputs(cache), ctx)}}
    axes_ctx = head.blocks.ctx_axes(contract)
    video_axes = [BATCH] + [None] * 4
    cond_axes = [[a if isinstance(a, str) else None for a in c.shape] for c in contract.cond]
    hidden_axes = [BATCH] + [None] * (h.dim() - 1)
    mod_axes = [BATCH] + [None] * (modulated.dim() - 1)
    ranges = {**contract.axes, BATCH: den_range}
    den_io = {**den_io, "contract": contract}
    for kind, module, inputs, axes, names_in, names_out in (
            (DENOISER_HEAD, head, (*example, *refs), [video_axes, [BATCH], *cond_axes, hidden_axes, mod_axes,
                                                     hidden_axes], head_inputs(contract, False),
             head_outputs(cache, False)),
            (DENOISER_TAIL, tail, (h, *ctx), [hidden_axes, *axes_ctx], tail_inputs(cache, False), tail_outputs(False))):
        io = _io(kind, den_io, shapes, cache, "batch")
        meta = ExportMetadata(kind, io=io, batch={"min": den_range[0], "max": den_range[1]}, cache=cache, **common)
        _export(module, inputs, out_dir / variant_file(kind), names_in, names_out, axes, ranges, opset,
                meta.to_props(), external_data)
    cache["error"] = check_split(out_dir, contract, cache, example, refs)
    step_io = {**step_io, "contract": contract}
    for kind, base in ((STEP_HEAD, DENOISER_HEAD), (STEP_TAIL, DENOISER_TAIL)):
        meta = ExportMetadata(kind, io=_io(kind, step_io, shapes, cache, "rows"),
                              batch={"min": step_range[0], "max": step_range[1]}, cache=cache, **common)
        compose(out_dir / variant_file(base), out_dir / variant_file(kind), kind, contract, cache, step_range, opset,
                meta.to_props())
    for kind in (DENOISER_HEAD, DENOISER_TAIL):   # restamp with the measured error
        _restamp(out_dir / variant_file(kind), cache)
    return cache


def _restamp(path: Path, cache: dict) -> None:
    import json

    import onnx

    from vdit_deploy.export.metadata import stamp

    model = onnx.load(str(path), load_external_data=False)
    stamp(model, {"vdit.cache": json.dumps(cache, sort_keys=True)})
    onnx.save_model(model, str(path))


def check_split(out_dir: Path, contract, cache: dict, example, refs) -> float:
    """ONNX Runtime: head + tail against denoiser.onnx on the traced inputs, and the head's skipped
    output fed the true tail residual -> the worst relative L2 (refused above CACHE_TOLERANCE)."""
    from vdit_deploy.export.graph_compare import _session

    feed = {name: t.numpy() for name, t in zip(("x_t", "t", *contract.names), example)}
    full = _session(out_dir / variant_file(DENOISER)).run(["out"], feed)[0]
    head, tail = (_session(out_dir / variant_file(k)) for k in (DENOISER_HEAD, DENOISER_TAIL))
    head_feed = {**feed, **{n: r.numpy() for n, r in zip(REF_INPUTS, refs)}}
    outs = dict(zip(head_outputs(cache, False), head.run(None, head_feed)))
    tail_feed = {n: outs[n] for n in tail_inputs(cache, False)}
    out, tail_residual = tail.run(None, tail_feed)
    skipped = head.run(["out"], {**head_feed, "tail_residual": tail_residual})[0]
    rel = lambda a: float(np.linalg.norm(a - full) / max(np.linalg.norm(full), 1e-30))
    error = max(rel(out), rel(skipped))
    if not error <= CACHE_TOLERANCE:
        raise VditError(f"the cache split after block {cache['blocks']} does not reproduce denoiser.onnx: relative "
                        f"L2 {error:.2e} > {CACHE_TOLERANCE:g}")
    return error


def compose(denoiser_path: Path, path: Path, kind: str, contract, cache: dict, step_range: tuple, opset: int,
            metadata: dict) -> Path:
    """step-head / step-tail from the denoiser's: the head gets the 2B rows from Concat nodes (x_t and t
    twice, each conditioning input with its null_<name>); both end in GuidedUpdate on their `out`."""
    import onnx
    import torch
    from onnx import helper

    from vdit_deploy.export.metadata import NULL_PREFIX
    from vdit_deploy.export.tracing import (STEP_OUTPUTS, STEP_TAIL as UPDATE, GuidedUpdate, _check_saved,
                                                _trace)
    from vdit_deploy.samplers import COEF_NAMES

    from vdit_deploy.export.tracing import fixed_sizes, traced_size

    lo, hi = step_range
    n = traced_size(lo, hi, fixed_sizes(contract))
    video = lambda: torch.zeros(n, *contract.latent)
    example = (video(), torch.zeros(2 * n, contract.out_channels, *contract.latent[1:]), torch.tensor([2.0]),
               torch.linspace(0.1, 1.5, len(COEF_NAMES)), video(), video(), video())
    dim = torch.export.Dim("batch", min=lo, max=hi)
    shapes = ({0: dim}, {0: 2 * dim}, None, None, {0: dim}, {0: dim}, {0: dim})
    update = _trace(GuidedUpdate(), example, ("x_t", "update_out", *UPDATE), STEP_OUTPUTS, shapes, opset).model_proto
    onnx.compose.add_prefix_graph(update.graph, "update/", rename_inputs=False, rename_outputs=False, inplace=True)

    model = onnx.load(str(denoiser_path))
    g = model.graph
    for node in g.node:                                     # the denoiser's `out` feeds the update
        node.output[:] = ["update_out" if o == "out" else o for o in node.output]
    nodes = list(g.node)
    specs = {i.name: i for i in g.input}
    if kind == STEP_HEAD:
        doubled = {n: f"{n}_2b" for n in ("x_t", "t", *contract.names)}
        for node in nodes:
            node.input[:] = [doubled.get(i, i) for i in node.input]
        nodes = [helper.make_node("Concat", [n, NULL_PREFIX + n if n in contract.names else n], [doubled[n]],
                                  name=f"step/concat_{n}", axis=0) for n in doubled] + nodes
        for name in ("t", *contract.names):                 # B rows; the null inputs as their prompts
            for spec_name in (name, NULL_PREFIX + name) if name in contract.names else (name,):
                spec = onnx.ValueInfoProto()
                spec.CopyFrom(g.input[[i.name for i in g.input].index(name)])
                spec.name = spec_name
                spec.type.tensor_type.shape.dim[0].dim_param = "batch"
                specs[spec_name] = spec
    for name in ("hidden", *ctx_inputs(cache), *REF_INPUTS):
        if name in specs:                                    # the split tensors: 2B rows
            specs[name].type.tensor_type.shape.dim[0].dim_param = "rows"
    specs.update({i.name: i for i in update.graph.input if i.name != "update_out"})   # x_t (B) and the update's
    names_in = head_inputs(contract, True) if kind == STEP_HEAD else tail_inputs(cache, True)
    names_out = head_outputs(cache, True) if kind == STEP_HEAD else tail_outputs(True)
    outputs = {o.name: o for o in [*g.output, *update.graph.output]}
    for name in ("hidden", *ctx_inputs(cache), "residual", "modulated", "tail_residual"):
        if name in outputs:
            outputs[name].type.tensor_type.shape.dim[0].dim_param = "rows"
    del g.node[:]
    g.node.extend([*nodes, *update.graph.node])
    del g.input[:]
    g.input.extend(specs[n] for n in names_in)
    del g.output[:]
    g.output.extend(outputs[n] for n in names_out)
    del g.value_info[:]
    g.initializer.extend(update.graph.initializer)
    model.functions.extend(update.functions)
    del model.metadata_props[:]
    model.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=val) for k, val in metadata.items())
    onnx.save_model(model, str(path))
    return _check_saved(path)


def verify_rows(export_dir: Path, graphs: dict, trajectories: dict, torch_rt, tolerance: float) -> list:
    """`vdit verify`'s rows for the split graphs: head + tail (nothing cached: every step in full, as a
    cached sampler's first one) against PyTorch, the denoiser pair on the 2B rows a guided step feeds,
    the step pair's x_prev on the step's inputs (export/verify.py's scales)."""
    from vdit_deploy.export.metadata import NULL_PREFIX, STEP_STATE
    from vdit_deploy.export.graph_compare import Comparison, _session, pieces, step_scale
    from vdit_deploy.samplers import apply_step

    kinds = {m.kind: (p, m) for p, m in graphs.items()}
    rows = []
    for head_kind, tail_kind, output in ((DENOISER_HEAD, DENOISER_TAIL, "out"), (STEP_HEAD, STEP_TAIL, "x_prev")):
        if head_kind not in kinds or tail_kind not in kinds:
            continue
        (head_path, meta), (tail_path, _) = kinds[head_kind], kinds[tail_kind]
        step = head_kind == STEP_HEAD
        head, tail = _session(head_path), _session(tail_path)
        dims = {i.name: [int(d) for d in i.shape[1:]] for i in head.get_inputs() if i.name in REF_INPUTS}
        row = Comparison(f"{head_path.stem}+{tail_path.stem.split('-')[1]}", output, tolerance)
        lo, hi = meta.batch_range()
        for b, records in trajectories.items():
            for (x, t, cond, null, g, coefs, noise), out in records:
                if step:
                    if not lo <= b <= hi:
                        continue
                    feed = {"x_t": x, "t": np.full(b, t, np.float32), **cond,
                            **{NULL_PREFIX + k: val for k, val in null.items()}, "guidance": np.float32([g]),
                            "coefs": coefs, "noise": noise, **{n: np.zeros_like(x) for n, _ in STEP_STATE}}
                    feeds = [(feed, 2 * b, None)]
                else:
                    xx, tt = np.concatenate([x, x]), np.full(2 * b, t, np.float32)
                    both = {k: np.concatenate([cond[k], null[k]]) for k in cond}
                    feeds = [({"x_t": xx[i:j], "t": tt[i:j], **{k: val[i:j] for k, val in both.items()}}, j - i, (i, j))
                             for i, j in pieces(2 * b, lo, hi)]
                for feed, n, cut in feeds:
                    feed = {**feed, **{name: np.zeros((n, *d), np.float32) for name, d in dims.items()}}
                    got = dict(zip(head_outputs(meta.cache, step), head.run(None, feed)))
                    tail_feed = {k: got[k] if k in got else feed[k] for k in tail_inputs(meta.cache, step)}
                    result = tail.run([output], tail_feed)[0]
                    if step:
                        row.add(result, apply_step(x, out, coefs, noise), step_scale(x, out, coefs, noise))
                    else:
                        i, j = cut
                        ref = torch_rt.denoise(feed["x_t"], feed["t"], {k: val[i:j] for k, val in both.items()})
                        row.add(result, ref)
        rows.append(row)
    return rows
