"""INT8 with onnxruntime.quantization: a static Q/DQ graph for TensorRT and a dynamic one for CPUs.

    denoiser.int8-qdq.onnx  static: weights per-channel, activations per-tensor, ranges fitted on a
                            calibration set (collect.py). Explicit quantization: for TensorRT
                            (--target tensorrt) symmetric int8, which it builds as an INT8 engine; for a
                            CPU asymmetric u8 activations, which ONNX Runtime runs (cpu_isa.py).
    denoiser.int8-dynamic.onnx  dynamic: int8 weights, activation ranges measured per call
                            (DynamicQuantizeLinear + MatMulInteger). On AVX-512 VNNI CPUs it is the
                            fastest INT8 form in ONNX Runtime, and needs no calibration ranges. Written
                            one weight at a time (int8_dynamic.py: onnxruntime's quantize_dynamic holds
                            3.5x the fp32 weights), with <name>.data beside it past 256 MB.
    step.int8-qdq.onnx      the fused step graph with the same Q/DQ rules, calibrated on the same
                            denoiser calls (its guidance, clip and affine update stay float).
`vdit sample --runtime ort --precision int8` picks the dynamic graph; `vdit build --precision int8`
(TensorRT) the Q/DQ ones.

Only the compute layers (MatMul / Gemm / Conv with constant weights) are quantized. Layers that the
sensitivity sweep (sensitivity.py) shows to dominate the error stay float (DEFAULT_SENSITIVE):
adaLN modulation (one matmul per sample whose output scales every token: its error is applied
everywhere), the final projection (writes eps directly), the tubelet embedding (its input x_t spans
very different ranges from t=T-1 to 0: alone it cost most of the Q/DQ error), and the timestep /
label embeddings. The
attention cores (QK^T, softmax, AV) have no weights and stay float too.

The first FLOAT_STEPS steps of the calibration set's sampler run in float (`--float-steps`, recorded in
the graph: int8_bins.float_record; ONNX Runtime takes the export's fp32 graph for them). Those noisy
steps decide each video's layout, and an INT8 error there is amplified along the whole trajectory: on
the shipped checkpoint the Q/DQ graph's worst video of 16 went from 29.2 to 34.3 dB with its first 2
of 15 UniPC steps in float (docs/calibration.md). Dynamic INT8 is 2.5x more accurate on those steps
and keeps them.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from vdit_deploy.calibration.graph import COMPUTE_OPS, check_patterns, select
from vdit_deploy.errors import VditError
from vdit_deploy.export.metadata import find_onnx, read_metadata
from vdit_deploy.export.variants import DENOISER, INT8_DYNAMIC, INT8_QDQ, STEP, variant_file
from vdit_deploy.files import check_output, temp_dir
from vdit_deploy.progress import bar
from vdit_deploy.runtimes.cpu_isa import META_KEY, Int8Choice, choose

MODES = {"qdq": INT8_QDQ, "dynamic": INT8_DYNAMIC}       # mode -> file precision tag
METHODS = ("minmax", "percentile", "entropy")
DEFAULT_METHOD = "minmax"       # measured best on held-out seeds of the shipped model (docs/calibration.md)
FLOAT_STEPS = {"qdq": 2, "dynamic": 0}     # per mode: the first steps that run in float (measured, above)
DEFAULT_SENSITIVE = (r"adaLN_modulation", r"^final_layer", r"^t_embedder", r"^y_embedder", r"^tubelet_embed",
                     r"scaled_dot_product_attention",
                     # the same roles in diffusers' Latte / PixArt blocks (under the adapter's `net.`)
                     r"^net\.adaln_single\.", r"^net\.proj_out/", r"^net\.pos_embed\.", r"^net\.caption_projection\.")


def variant_path(export_dir, mode: str) -> Path:
    if mode not in MODES:
        raise VditError(f"int8 mode must be one of {', '.join(MODES)}, got {mode!r}")
    return find_onnx(export_dir, DENOISER).with_name(variant_file(DENOISER, MODES[mode]))


@contextlib.contextmanager
def quiet():
    """onnxruntime.quantization prints progress and logs a pre-processing hint on the root logger."""
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.getLogger().setLevel(level)


def quantize_int8(export_dir, calib_dir=None, mode: str = "dynamic", method: str = DEFAULT_METHOD,
                  keep_fp=DEFAULT_SENSITIVE, only=None, out=None, per_channel: bool = True,
                  target=None, progress: bool = False, t_bins: int = 1,
                  smooth: float | None = None, float_steps: int | None = None) -> Path:
    """export_dir/denoiser.onnx -> denoiser.int8-dynamic.onnx (dynamic) or denoiser.int8-qdq.onnx (qdq); qdq
    also makes step.int8-qdq.onnx from the export's fused step graph (what TensorRT's int8 build
    compiles), calibrated on the same denoiser calls. Returns the denoiser's path.

    keep_fp: patterns (calibration/graph.py) of layers left in float. only: if given, quantize only
    the nodes matching these patterns (the sensitivity sweep). out: another output path for the
    denoiser (no step graph then). calib_dir is required for qdq; for dynamic it is only checked
    against the model. target: the CPU (vnni, avx2, arm64), tensorrt or a board profile the graph is
    for (runtimes/cpu_isa.py), None for this CPU: it decides the INT8 types, recorded in the graph.
    progress: a bar per calibration batch on stderr (vdit_deploy/progress.py). t_bins: qdq only, one set
    of activation scales per timestep bin (calibration/int8_bins.py). smooth: SmoothQuant's alpha
    (calibration/smooth.py), None for none. float_steps: the calibration sampler's first steps that run
    in float (int8_bins.float_record), None for the mode's FLOAT_STEPS."""
    from vdit_deploy.calibration.collect import load_calibration_set
    from vdit_deploy.calibration.fp16 import variant_sources
    from vdit_deploy.calibration.int8_bins import check_bins, check_float_steps, float_record, quantize_bins
    from vdit_deploy.calibration.smooth import check_alpha

    check_patterns([*keep_fp, *(only or ())])     # before any graph is loaded or written
    choice = choose(mode, target)
    if check_bins(t_bins) != 1 and mode != "qdq":
        raise VditError("--t-bins applies to the static Q/DQ graph (--mode qdq): dynamic INT8 measures its ranges per call")
    if smooth is not None and calib_dir is None:
        raise VditError("--smooth needs a calibration set (--calib): its scales come from the activations' ranges")
    if check_alpha(smooth) is not None and t_bins != 1:
        raise VditError("--smooth with --t-bins is not supported: each bin would smooth (and so quantize) the "
                        "weights differently; use one of them")
    if method not in METHODS:
        raise VditError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    float_steps = FLOAT_STEPS.get(mode, 0) if float_steps is None else check_float_steps(float_steps)
    if float_steps and calib_dir is None and mode != "qdq":     # (qdq without a set is refused below)
        raise VditError("--float-steps needs a calibration set (--calib): its sampler's steps give the timesteps")
    src, *step = variant_sources(export_dir)
    meta = read_metadata(src)
    check_output(Path(out) if out else variant_path(export_dir, mode))
    cset = None
    if calib_dir is not None:
        cset = load_calibration_set(calib_dir, meta.checkpoint_sha256, meta.contract)
    elif mode == "qdq":
        raise VditError("static Q/DQ quantization needs a calibration set: run `vdit calibrate collect` first")
    rules = dict(mode=mode, method=method, keep_fp=keep_fp, only=only, per_channel=per_channel, choice=choice,
                 progress=progress, smooth=smooth, float_above=float_record(cset, float_steps) if cset is not None else None)

    def run(graph, dest, batches_of):     # batches_of(cset) -> batches(lo, hi) of that set
        if t_bins == 1:
            return quantize_graph(graph, dest, cset and batches_of(cset), **rules)
        return quantize_bins(graph, dest, cset, batches_of, t_bins,
                             lambda s, o, b: quantize_graph(s, o, b, **rules), progress)

    path = Path(out) if out else variant_path(export_dir, mode)
    # dynamic INT8 is ONNX Runtime's CPU form, where a host-side step costs the same as a fused one
    if not (mode == "qdq" and out is None and only is None and step):
        return run(src, path, lambda c: c.batches)
    import onnx

    from vdit_deploy.calibration.fp16 import publish_files

    graph = step[0]
    names = [i.name for i in onnx.load(str(graph), load_external_data=False).graph.input]
    step_out = graph.with_name(variant_file(STEP, MODES[mode]))
    with temp_dir(path) as tmp:      # both graphs, or neither: made in a scratch dir, then renamed into place
        run(src, tmp / path.name, lambda c: c.batches)
        run(graph, tmp / step_out.name, lambda c: (lambda lo, hi: c.step_batches(lo, hi, names)))
        publish_files(tmp, [path, step_out])
    return path


def ranges_cache_writer():
    """onnxruntime's calibration-cache writer: quantize_static takes the fitted ranges only through it."""
    import onnxruntime

    try:
        from onnxruntime.quantization.calibrate import save_tensors_data
    except ImportError:
        raise VditError(f"INT8 Q/DQ needs onnxruntime >= 1.27 (its calibration cache); this is "
                        f"{onnxruntime.__version__}: pip install -U 'onnxruntime>=1.27'") from None
    return save_tensors_data


def quantize_graph(src: Path, out: Path, batches, mode: str, method: str, keep_fp, only, per_channel: bool,
                   choice: Int8Choice | None = None, progress: bool = False, smooth: float | None = None,
                   float_above: dict | None = None) -> Path:
    """One fp32 graph (denoiser or fused step) -> its INT8 variant at `out`, with the types of `choice`
    (default: this CPU's) stamped in its metadata. batches(lo, hi): feed dicts in the graph's batch
    range for static calibration (qdq). The step's own arithmetic has no MatMul / Gemm / Conv: it
    stays float. progress: a bar per calibration batch (qdq) or over the graph's nodes (dynamic).
    float_above: int8_bins.float_record's record, stamped as qdq_bins.FLOAT_KEY (None: every call INT8)."""
    import onnx

    from vdit_deploy.calibration.fp16 import save_variant
    from vdit_deploy.calibration.int8_dynamic import quantize_dynamic_streaming

    choice = choice or choose(mode)
    # dynamic INT8 reads the weights one at a time (int8_dynamic.py): the graph's structure is enough here
    model = onnx.load(str(src), load_external_data=mode == "qdq" or smooth is not None)
    compute = select(model, [*COMPUTE_OPS], COMPUTE_OPS)
    excluded = set(select(model, keep_fp, COMPUTE_OPS)) if keep_fp else set()
    nodes = [n for n in compute if n not in excluded]
    if only is not None:
        nodes = select(model, only, COMPUTE_OPS)
    if not nodes:
        raise VditError("no layer is left to quantize (check --keep-fp / the layer patterns)")
    props = [(p.key, p.value) for p in model.metadata_props]
    with temp_dir(out) as tmp, quiet():
        fp32 = Path(tmp) / "fp32.onnx"
        if smooth is not None:      # activation outliers into the weights first (calibration/smooth.py)
            model = smoothed(model, Path(tmp), nodes, lambda: batches(*read_metadata(src).batch_range()), smooth)
        if mode == "dynamic":
            if smooth is not None:
                onnx.save(model, str(fp32), save_as_external_data=True, location="fp32.onnx.data")
            del model
            quantized, data = quantize_dynamic_streaming(fp32 if smooth is not None else src, Path(tmp) / out.name,
                                                         nodes, choice, per_channel, progress)
        else:
            quantized, data = quantize_static_qdq(model, src, fp32, nodes, batches, method, per_channel, choice,
                                                  progress), None
        del quantized.metadata_props[:]
        for key, value in props:
            quantized.metadata_props.add(key=key, value=value)
        quantized.metadata_props.add(key=META_KEY, value=choice.to_json())
        if float_above is not None:
            import json

            from vdit_deploy.runtimes.qdq_bins import FLOAT_KEY
            quantized.metadata_props.add(key=FLOAT_KEY, value=json.dumps(float_above))
        return save_variant(quantized, out, MODES[mode], data)


def smoothed(model, tmp: Path, nodes, feeds, alpha: float):
    """The model with SmoothQuant's scales folded in. Its layers' input statistics are streamed from a
    copy written to tmp (as the range fit streams, in bounded memory); onnx.save empties the saved
    proto's tensors, so the model is read back from that copy and smoothed."""
    import onnx

    from vdit_deploy.calibration.smooth import channel_max, smooth_model, smoothed_nodes

    names = sorted({n.input[0] for n in smoothed_nodes(model, nodes)})
    if not names:
        return model
    raw = tmp / "unsmoothed.onnx"
    onnx.save(model, str(raw), save_as_external_data=True, location="unsmoothed.onnx.data")
    del model
    stats = channel_max(raw, names, feeds, tmp)
    return smooth_model(onnx.load(str(raw)), stats, nodes, alpha)


def drop_weight_shapes(model) -> None:
    """The exporter records the weights' shapes in value_info; onnxruntime's quantizer (1.27 .. 1.31.1)
    transposes every Gemm weight in place under its own name and its shape inference then fails ("Inferred
    shape and existing shape differ"). Those entries say nothing the initializers don't: removed in place."""
    weights = {i.name for i in model.graph.initializer}
    kept = [vi for vi in model.graph.value_info if vi.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def quantize_static_qdq(model, src: Path, fp32: Path, nodes, batches, method: str, per_channel: bool,
                        choice: Int8Choice, progress: bool):
    """onnxruntime's quantize_static on the ranges fitted by ranges.py: the Q/DQ graph's ModelProto.
    fp32: a scratch path the float graph is written to (onnxruntime.quantization loads its own copy)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    from vdit_deploy.calibration.ranges import fit_ranges

    tmp = fp32.parent
    raw = tmp / "q.onnx"
    drop_weight_shapes(model)
    onnx.save(model, str(fp32), save_as_external_data=True, location="fp32.onnx.data")
    del model          # onnxruntime.quantization loads its own copy: one fp32 graph in memory, not two
    try:
        save_tensors_data = ranges_cache_writer()
        lo, hi = read_metadata(src).batch_range()
        calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
        # One batch at a time, only the tensors Q/DQ quantizes (ranges.py); onnxruntime takes
        # the ranges as its calibration cache and builds the graph from them.
        feeds = lambda: bar(batches(lo, hi), show=progress, desc=f"calibrate {src.name}", unit="batch")
        ranges, _ = fit_ranges(fp32, nodes, feeds, method, tmp, symmetric=choice.activation_symmetric)
        save_tensors_data(ranges, tmp / "ranges.json")
        # Symmetric weights; activations symmetric s8 for TensorRT, asymmetric u8 for a CPU (cpu_isa.py).
        # MatMulConstBOnly: attention's activation x activation matmuls stay float.
        quantize_static(fp32, raw, None, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(COMPUTE_OPS),
                        per_channel=per_channel, nodes_to_quantize=nodes, reduce_range=choice.reduce_range,
                        weight_type=choice.quant_type("weight"), activation_type=choice.quant_type("activation"),
                        calibrate_method=calib, calibration_cache_path=tmp / "ranges.json",
                        use_external_data_format=True,
                        extra_options={"ActivationSymmetric": choice.activation_symmetric, "WeightSymmetric": True,
                                       "MatMulConstBOnly": True})
    except VditError:
        raise
    except Exception as e:   # onnxruntime.quantization raises plain ValueError / RuntimeError
        raise VditError(f"qdq INT8 quantization of {src.name} failed: {type(e).__name__}: "
                        f"{str(e).splitlines()[0]}") from None
    return onnx.load(str(raw))


def calibration_error(path, export_dir, calib_dir) -> float:
    """Relative L2 of an INT8 graph's output against the fp32 denoiser's on the calibration set."""
    from vdit_deploy.calibration.collect import load_calibration_set, run_onnx
    from vdit_deploy.metrics import rel_l2

    meta = read_metadata(find_onnx(export_dir))
    cset = load_calibration_set(calib_dir, meta.checkpoint_sha256, meta.contract)
    return rel_l2(run_onnx(path, cset), run_onnx(find_onnx(export_dir), cset))
