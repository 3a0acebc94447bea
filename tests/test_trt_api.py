"""TensorRT and cuda-python API conformance, in CI, without TensorRT or a GPU.

Every test here checks API conformance and control flow against the APIs recorded from the real
binding wheels (tests/data/trt-api/, strict fakes in tests/trt_fake.py). None of them computes a
number or stands in for a GPU test: numerics are tests/test_trt_gpu.py's, on a GPU with TensorRT.

Supported: TensorRT 10.3 (JetPack 6, weakly typed, calibrators), 10.13, 10.16 and 11.4 (strongly
typed only); cuda-python 11.8, 12.2 (cuda.cudart), 12.9 and 13.4. TensorRT 8.6 is refused in one line.
"""
import ast
import dataclasses
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import trt_fake
from conftest import open_built
from trt_fake import CUDART_VERSIONS, TRT_SUPPORTED, TRT_UNSUPPORTED, World, install, surface
from vdit_deploy.config import preset
from vdit_deploy.contract import CondInput, Contract, null_digest, save_null
from vdit_deploy.schedules import Schedule
from vdit_deploy.samplers import COEF_NAMES
from vdit_deploy.errors import VditError
from vdit_deploy.export.metadata import NULL_PREFIX, ExportMetadata
from vdit_deploy.runtimes.engine_cache import AxisProfile, EngineProfile, import_tensorrt

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "runtimes" / f for f in ("trt_build.py", "trt_network.py", "trt_runtime.py", "trt_engine.py", "trt_cache.py",
                                          "trt_decoder.py", "engine_cache.py")]
CFG = preset("tiny")
TRT_10_3, TRT_11 = "10.3.0", "11.4.0.106"
PROFILE = EngineProfile.of(AxisProfile(1, 2, 4))


# ---- small exports whose graphs hold the layers the build treats specially ----------------------------
CLASS = Contract(latent=tuple(CFG.video_shape), output="eps", schedule=Schedule(),
                 cond=(CondInput("y", "int32", ("batch",), CFG.num_classes),))
# the text-conditioned, learned-sigma shape: T5-like embeddings (batch, seq, D), 2C output channels
TEXT = Contract(latent=(4, 2, 8, 8), output="eps+var", schedule=Schedule(), axes={"seq": (1, 16)},
                cond=(CondInput("encoder_hidden_states", "float32", ("batch", "seq", 32)),))
ONNX_TYPES = {"float32": TensorProto.FLOAT, "int32": TensorProto.INT32}


def null_of(contract: Contract) -> dict:
    """The null conditioning: the null label, or zero embeddings at the longest prompt."""
    return {c.name: np.full([1 if d == "batch" else contract.axes[d][1] if isinstance(d, str) else d for d in c.shape],
                            c.classes or 0, c.dtype) for c in contract.cond}


def with_null(contract: Contract) -> Contract:
    return dataclasses.replace(contract, null_sha256=null_digest(null_of(contract)))


def io_specs(kind: str, contract: Contract) -> dict:
    """The export's I/O spec (export/onnx_export._io's form) of a step or denoiser graph."""
    video = ["batch", *contract.latent]
    cond = [{"name": c.name, "shape": list(c.shape), "dtype": c.dtype} for c in contract.cond]
    inputs = [{"name": "x_t", "shape": video, "dtype": "float32"}, {"name": "t", "shape": ["batch"], "dtype": "float32"},
              *cond]
    if kind == "step":
        inputs += [{**c, "name": NULL_PREFIX + c["name"]} for c in cond]
        inputs += [{"name": "guidance", "shape": [1], "dtype": "float32"},
                   {"name": "coefs", "shape": [len(COEF_NAMES)], "dtype": "float32"},
                   *({"name": n, "shape": video, "dtype": "float32"} for n in ("noise", "x0_prev", "corr"))]
        outputs = [{"name": n, "shape": video, "dtype": "float32"} for n in ("x_prev", "x0", "corr_next")]
    else:
        outputs = [{"name": "out", "shape": ["batch", contract.out_channels, *contract.latent[1:]], "dtype": "float32"}]
    return {"inputs": inputs, "outputs": outputs}


def step_graph(kind: str, qdq: bool = False, precision: str = "fp32", contract: Contract = CLASS) -> onnx.ModelProto:
    """A step or denoiser graph with the export's inputs and outputs for `contract`, whose body is a
    decomposed LayerNorm (ReduceMean, Sub, Pow, Sqrt, Div), a Softmax, and an integer REDUCE over
    x_t's shape."""
    io = io_specs(kind, with_null(contract))
    value = lambda spec: helper.make_tensor_value_info(spec["name"], ONNX_TYPES[spec["dtype"]], spec["shape"])  # noqa: E731
    consts = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
              helper.make_tensor("epsilon", TensorProto.FLOAT, [], [1e-6]),
              helper.make_tensor("scale", TensorProto.FLOAT, [], [0.05]),
              helper.make_tensor("zero", TensorProto.INT8, [], [0])]
    x = "x_t"
    nodes = []
    if qdq:
        nodes += [helper.make_node("QuantizeLinear", ["x_t", "scale", "zero"], ["x_q"]),
                  helper.make_node("DequantizeLinear", ["x_q", "scale", "zero"], ["x_dq"])]
        x = "x_dq"
    nodes += [
        helper.make_node("ReduceMean", [x], ["mean"], axes=[-1]),
        helper.make_node("Sub", [x, "mean"], ["centred"]),
        helper.make_node("Pow", ["centred", "two"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "epsilon"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["centred", "std"], ["normed"]),
        helper.make_node("Softmax", ["normed"], ["attn"], axis=-1),
        helper.make_node("Shape", ["x_t"], ["shape"]),
        helper.make_node("ReduceProd", ["shape"], ["count"], keepdims=0),      # int64 REDUCE
        helper.make_node("Cast", ["count"], ["count_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["attn", "count_f"], ["body"]),
    ]
    if kind == "step":
        nodes += [helper.make_node("Add", ["body", "noise"], ["x_prev"]), helper.make_node("Identity", ["body"], ["x0"]),
                  helper.make_node("Identity", ["corr"], ["corr_next"])]
    else:   # eps, then a learned variance for an eps+var model: 2C channels
        parts = ["body"] * (contract.out_channels // contract.latent[0])
        nodes.append(helper.make_node("Concat", parts, ["out"], axis=1))
    graph = helper.make_graph(nodes, kind, [value(s) for s in io["inputs"]], [value(s) for s in io["outputs"]],
                              initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    meta = ExportMetadata(kind, with_null(contract), {"class": "test", "config": {}}, io, "0" * 64,
                          batch={"min": 1, "max": 8}, precision=precision)
    for k, v in meta.to_props().items():
        model.metadata_props.add(key=k, value=v)
    return model


def write_graphs(root: Path, contract: Contract) -> Path:
    root.mkdir()
    for kind in ("step", "denoiser"):
        onnx.save(step_graph(kind, contract=contract), str(root / f"{kind}.onnx"))
        onnx.save(step_graph(kind, precision="fp16", contract=contract), str(root / f"{kind}.fp16.onnx"))
        onnx.save(step_graph(kind, qdq=True, precision="int8-qdq", contract=contract), str(root / f"{kind}.int8-qdq.onnx"))
    save_null(null_of(contract), root)
    return root


@pytest.fixture
def export(tmp_path):
    """A class-conditioned export (the built-in model's contract)."""
    return write_graphs(tmp_path / "export", CLASS)


@pytest.fixture
def text_export(tmp_path):
    """A text-conditioned, learned-sigma export: encoder_hidden_states (batch, seq 1..16, 32), out 2C."""
    return write_graphs(tmp_path / "text", TEXT)


def calibration_set(root: Path, contract: Contract = CLASS, n: int = 4) -> Path:
    """NAME.npy for every input of the step graph (implicit INT8 feeds them all)."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for spec in io_specs("step", with_null(contract))["inputs"]:
        shape = [contract.axes[d][1] if isinstance(d, str) and d != "batch" else d for d in spec["shape"]]
        shape = [n, *shape[1:]] if spec["shape"][0] == "batch" else [n, *shape]
        np.save(root / f"{spec['name']}.npy", rng.integers(0, 2, shape).astype(spec["dtype"]))
    return root


def fake(monkeypatch, trt_version=TRT_10_3, cudart_version="12.9.10", **world) -> World:
    return install(monkeypatch, trt_version, cudart_version, World(**world))


def build(export, precision, **kw):
    from vdit_deploy.runtimes.trt_network import build_engine

    return build_engine(export / {"fp32": "step.onnx", "fp16": "step.onnx", "int8": "step.int8-qdq.onnx",
                                  "best": "step.int8-qdq.onnx"}[precision],
                        precision, PROFILE, progress=False, log=lambda m: None, **kw)


# ---- 1. static: every cudart call and tensorrt name in the source, per recorded version -----------------
def source_calls():
    """(file, line, function, positional count, keywords, unpacked length or None) for cudart calls;
    (file, line, dotted name) for tensorrt module references `trt.X[.Y]`."""
    cudart_calls, trt_names, assigned = [], [], []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        unpacked = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple) and isinstance(node.value, ast.Call):
                unpacked[id(node.value)] = len(node.targets[0].elts)
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Attribute) and not (isinstance(target.value, ast.Name)
                                                                  and target.value.id == "self"):
                        assigned.append((path.name, node.lineno, target.attr))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("cuda"):
                owner = node.func.value
                if (isinstance(owner, ast.Name) and owner.id == "cudart") or (
                        isinstance(owner, ast.Attribute) and owner.attr == "cudart"):
                    cudart_calls.append((path.name, node.lineno, node.func.attr, len(node.args),
                                         [k.arg for k in node.keywords], unpacked.get(id(node))))
            if isinstance(node, ast.Attribute):
                chain, inner = [node.attr], node.value
                while isinstance(inner, ast.Attribute) and inner.attr != "trt":
                    chain.insert(0, inner.attr)
                    inner = inner.value
                is_trt = (isinstance(inner, ast.Name) and inner.id == "trt") or (
                    isinstance(inner, ast.Attribute) and inner.attr == "trt")
                if is_trt and chain[0] == "__version__":
                    chain = ["__version__"]   # a str: its methods are not TensorRT's
                if is_trt and len(chain) <= 2:
                    trt_names.append((path.name, node.lineno, ".".join(chain)))
    # keep only the outermost chain of each reference (trt.A.B, not also trt.A)
    full = {(f, line, n) for f, line, n in trt_names}
    trt_names = sorted(x for x in full if not any(o[:2] == x[:2] and o[2].startswith(x[2] + ".") for o in full))
    return cudart_calls, trt_names, assigned


def trt_has(api: dict, dotted: str) -> bool:
    head, _, member = dotted.partition(".")
    if not member:
        return head in api["classes"] or head in api["functions"] or head in api["constants"] or head == "__version__"
    cls = api["classes"].get(head)
    return cls is not None and (member in cls.get("enum", {}) or member in cls.get("members", {}))


@pytest.mark.parametrize("version", CUDART_VERSIONS)
def test_every_cudart_call_matches_the_recorded_signature(version):
    """API conformance (not numerics): each cudart call in the source names a function of this
    cuda-python, passes an accepted argument count and keywords, and unpacks the returned tuple
    to its recorded length."""
    api = surface(f"cudart-{version}")["functions"]
    calls, _, _ = source_calls()
    assert len(calls) > 20
    problems = []
    enums = surface(f"cudart-{version}")["enums"]
    for file, line, name, nargs, keywords, unpack in calls:
        if name in enums:   # an enum made from its value, e.g. cudaMemcpyKind(1)
            assert nargs == 1 and not keywords, (file, line, name)
            continue
        spec = api.get(name)
        if spec is None:
            problems.append(f"{file}:{line} {name} does not exist")
            continue
        params = [p[0] for p in spec["params"]]
        required = [p[0] for p in spec["params"] if p[1] is None]
        given = params[:nargs] + keywords
        if nargs > len(params) or set(keywords) - set(params) or set(required) - set(given):
            problems.append(f"{file}:{line} {name}({nargs} args, {keywords}) vs ({', '.join(params)})")
        if unpack is not None and unpack != len(spec["returns"]):
            problems.append(f"{file}:{line} {name} unpacked to {unpack}, returns {spec['returns']}")
    assert not problems, "\n".join(problems)


def test_cudagraphinstantiate_would_have_broken_on_cuda_python_11_8():
    """API conformance (not numerics): the signature change that made the runtime use
    cudaGraphInstantiateWithFlags, which is the same in every recorded release."""
    old = surface("cudart-11.8.7")["functions"]
    assert [p[0] for p in old["cudaGraphInstantiate"]["params"]] == ["graph", "pLogBuffer", "bufferSize"]
    for version in CUDART_VERSIONS:
        spec = surface(f"cudart-{version}")["functions"]["cudaGraphInstantiateWithFlags"]
        assert [p[0] for p in spec["params"]] == ["graph", "flags"] and len(spec["returns"]) == 2
    assert "cudaGraphInstantiate" not in {c[2] for c in source_calls()[0]}


def test_every_tensorrt_name_exists_and_absent_ones_are_guarded():
    """API conformance (not numerics): each `trt.X` / `trt.X.Y` in the source exists in some supported
    TensorRT; the names missing from a version are exactly the ones its guards avoid (checked at run
    time by test_every_tensorrt_name_is_exercised)."""
    _, names, _ = source_calls()
    apis = {v: surface(f"api-{v}") for v in TRT_SUPPORTED}
    missing_everywhere = [n for n in names if not any(trt_has(a, n[2]) for a in apis.values())]
    assert not missing_everywhere, missing_everywhere
    partial = {n[2]: [v for v, a in apis.items() if not trt_has(a, n[2])] for n in names}
    partial = {k: v for k, v in partial.items() if v}
    # TensorRT 11 dropped weak typing and implicit INT8: only those may be missing, and only on 11.x
    assert all(vs == [TRT_11] for vs in partial.values()), partial
    assert set(partial) <= {"BuilderFlag.FP16", "BuilderFlag.INT8", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS",
                            "IInt8EntropyCalibrator2", "IInt8EntropyCalibrator2.__init__"}, partial


def test_no_read_only_property_is_assigned():
    """API conformance (not numerics): every `obj.attr = ...` in the source (outside `self`) that
    names a TensorRT property names one that is settable in each supported version that has it."""
    _, _, assigned = source_calls()
    assert {"int8_calibrator", "precision", "progress_monitor", "DLA_core"} <= {attr for _, _, attr in assigned}
    problems = []
    for version in TRT_SUPPORTED:
        properties = {}   # attr -> settable anywhere in this version
        for cls in surface(f"api-{version}")["classes"].values():
            for name, spec in cls.get("members", {}).items():
                if spec["kind"] == "property":
                    properties[name] = properties.get(name, False) or spec["settable"]
        problems += [f"{file}:{line} .{attr} is read-only in TensorRT {version}"
                     for file, line, attr in assigned if properties.get(attr) is False]
    assert not problems, problems


# ---- 2. the engine build against the fake, per version and precision ------------------------------------
@pytest.mark.parametrize("version", TRT_SUPPORTED)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "best"])
def test_build_per_version_and_precision(monkeypatch, export, version, precision):
    """API conformance and control flow (not numerics): the real build_engine against the recorded
    TensorRT: weak typing with precision flags on 10.x, strongly typed with no flags on 11.x; TF32
    cleared for fp32 on both; overflow-prone float layers (POW included) pinned to fp32 only on
    10.x fp16, and never a layer whose output is an integer."""
    from vdit_deploy.runtimes.trt_network import build_engine, onnx_for, strongly_typed_only

    world = fake(monkeypatch, version)
    trt = import_tensorrt()
    strong = strongly_typed_only(trt)
    assert strong == version.startswith("11.")
    onnx_path = onnx_for(export, "step", precision, strong)
    engine, facts = build_engine(onnx_path, precision, PROFILE, progress=False, log=lambda m: None)
    assert engine.startswith(b"FAKE-ENGINE") and facts["strongly_typed"] == strong
    (record,) = world.builds
    flags = set(record["flags"])
    assert ("TF32" in flags) == (precision != "fp32")
    if strong:
        assert record["strongly_typed"] and not record["precisions"] and not flags & {"FP16", "INT8"}
        assert onnx_path.name == {"fp32": "step.onnx", "fp16": "step.fp16.onnx"}.get(precision, "step.int8-qdq.onnx")
        return
    assert ("FP16" in flags) == (precision != "fp32") and ("INT8" in flags) == (precision in ("int8", "best"))
    pinned = record["precisions"]
    if precision in ("fp16", "best"):
        types = record["layer_types"]
        assert "OBEY_PRECISION_CONSTRAINTS" in flags
        assert {types[n] for n in pinned} == {"REDUCE", "ELEMENTWISE", "SOFTMAX"}
        assert any(n.startswith("Pow") for n in pinned), pinned                       # the POW layer
        assert not any(n.startswith("ReduceProd") for n in pinned), pinned            # integer output
        assert all(v == {0: "FLOAT"} for v in record["output_types"].values())
        assert facts["fp32_pinned_layers"] == len(pinned) == 4
    else:
        assert not pinned


def test_pow_is_pinned_only_through_the_cast(monkeypatch, export):
    """Control flow (not numerics): network.get_layer returns a plain ILayer, which has no `op`; the
    build must downcast to IElementWiseLayer to see POW (the fake refuses any other downcast)."""
    world = fake(monkeypatch)
    trt = import_tensorrt()
    layer = object.__new__(trt.ILayer)
    with pytest.raises(AttributeError):
        layer.op
    build(export, "fp16")
    assert "Pow_2" in world.builds[0]["precisions"]


@pytest.mark.parametrize("version", [TRT_10_3, "10.16.1.11"])
def test_implicit_int8_calibration_on_10x(monkeypatch, export, tmp_path, version):
    """Control flow (not numerics): TensorRT 10.x's implicit INT8 with the entropy calibrator: batches
    go to device memory, the cache is written, and a second build reuses it (`calibrate trt-cache`
    says which); TensorRT 11 refuses calibration in one line."""
    world = fake(monkeypatch, version)
    calib = calibration_set(tmp_path / "calib")
    from vdit_deploy.runtimes.trt_network import build_engine

    _, facts = build_engine(export / "step.onnx", "int8", PROFILE, calibration=calib, progress=False,
                            log=lambda m: None)
    assert world.builds[0]["calibrated"] and not facts["calibration_cache_reused"]
    assert Path(facts["calibration_cache"]).read_bytes() == b"FAKE-CALIBRATION-CACHE"
    _, facts = build_engine(export / "step.onnx", "int8", PROFILE, calibration=calib, progress=False,
                            log=lambda m: None)
    assert facts["calibration_cache_reused"] and not world.builds[1]["calibrated"]
    import gc

    gc.collect()   # the calibrators' __del__ frees their device batches
    assert not world.device, world.device


def test_cli_calibrate_trt_cache_says_reused(monkeypatch, export, tmp_path):
    """Control flow (not numerics): `vdit calibrate trt-cache` says "wrote" when it calibrated and
    "reused" when TensorRT was handed the existing cache."""
    from vdit_deploy.cli import main

    fake(monkeypatch)
    monkeypatch.setattr("vdit_deploy.calibration.collect.load_calibration_set", lambda *a: None)
    calib = tmp_path / "calib"
    calib.mkdir()
    for name, shape, dtype in (("x_t", CFG.video_shape, np.float32), ("t", (), np.float32), ("y", (), np.int32)):
        np.save(calib / f"{name}.npy", np.zeros((4, *shape), dtype))   # the denoiser's inputs
    args = ["calibrate", "trt-cache", str(export), "--calib", str(calib)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    cache = export / "denoiser.calib.cache"
    said = [line for line in first.stdout.splitlines() if str(cache) in line]   # stdout: tqdm bars go to stderr
    assert said == [f"wrote {cache}"]
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    said = [line for line in second.stdout.splitlines() if str(cache) in line]
    assert said == [f"reused {cache} (delete it to calibrate again)"]


def test_calibration_refused_on_11(monkeypatch, export, tmp_path):
    """Control flow (not numerics): no implicit INT8 on TensorRT 11."""
    fake(monkeypatch, TRT_11)
    with pytest.raises(VditError, match="TensorRT 11 has no implicit INT8"):
        build(export, "int8", calibration=tmp_path)


@pytest.mark.parametrize("version", [TRT_10_3, TRT_11])
def test_timing_cache_from_elsewhere_is_replaced(monkeypatch, export, tmp_path, version):
    """Control flow (not numerics): a timing cache made on this GPU and TensorRT is used; one made on
    another device (a desktop's on a Jetson), or unreadable, is refused (ignore_mismatch=False) and a
    new cache is started and saved."""
    from vdit_deploy.runtimes.trt_network import build_engine

    world = fake(monkeypatch, version)
    cache = tmp_path / "timing.cache"
    notes = []
    for _ in range(2):   # made here, then used
        build_engine(export / "step.onnx", "fp32", PROFILE, timing_cache=cache, progress=False,
                     log=notes.append)
    here = cache.read_bytes()
    assert here.startswith(b"FAKE-TIMING-CACHE") and world.builds[-1]["timing_cache"] and not notes
    for foreign in (here.replace(world.gpu.encode(), b"Orin"), b"garbage"):
        cache.write_bytes(foreign)
        build_engine(export / "step.onnx", "fp32", PROFILE, timing_cache=cache, progress=False,
                     log=notes.append)
        assert cache.read_bytes() == here and world.builds[-1]["timing_cache"]
    assert len(notes) == 2 and all("was made on another GPU or TensorRT version" in n for n in notes)


def test_build_options_dla_workspace_level_and_progress(monkeypatch, export):
    """Control flow (not numerics): DLA core with GPU fallback, workspace limit, optimization level
    and the progress bars (IProgressMonitor subclass) on every supported TensorRT."""
    from vdit_deploy.runtimes.trt_network import BuildOptions, build_engine

    for version in TRT_SUPPORTED:
        with monkeypatch.context() as m:
            world = install(m, version, "12.9.10", World())
            _, facts = build_engine(export / "step.onnx", "fp32", PROFILE,
                                    BuildOptions(workspace_mb=64, opt_level=2, dla_core=0), progress=True,
                                    log=lambda msg: None)
            (record,) = world.builds
            assert record["settings"] == {"pools": {"WORKSPACE": 64 << 20}, "builder_optimization_level": 2,
                                          "DLA_core": 0, "default_device_type": "DLA"}
            assert "GPU_FALLBACK" in record["flags"] and record["progress_monitor"]
            assert facts["dla_gpu_fallback_layers"] == []   # the fake's DLA takes all but normalization layers


# ---- 3. the runtime against the fake, per cuda-python (and TensorRT 10.3 / 11.4) -------------------------
def run_steps(rt, n, stochastic_every=2, cond=None):
    coefs = np.zeros(len(COEF_NAMES), np.float32)
    coefs[:6] = [1.0, 0.5, 1.0, 0.9, 0.0, 0.4]
    x = np.zeros((2, *rt.contract.latent), np.float32)
    noise = np.zeros_like(x)
    for i in range(n):
        coefs[6] = 0.1 if i % stochastic_every else 0.0
        x = rt.step(x, 500 - i, cond or {"y": np.array([0, 1], np.int32)}, 2.0, coefs, noise)
    return np.asarray(x)


@pytest.mark.parametrize("trt_version", [TRT_10_3, TRT_11])
@pytest.mark.parametrize("cudart_version", CUDART_VERSIONS)
def test_runtime_warm_up_capture_and_replay(monkeypatch, export, trt_version, cudart_version):
    """Control flow (not numerics): TrtRuntime loads the built engines, runs the first step of
    each ping-pong direction eagerly, captures each direction once as a CUDA graph, then replays the
    graphs; builder and runtime share one Logger; closing frees every device resource."""
    world = fake(monkeypatch, trt_version, cudart_version)
    with open_built(export, "fp32") as rt:
        out = run_steps(rt, 6)
        assert out.shape == (2, *CFG.video_shape) and rt.cuda_graph and "CUDA graph" in rt.describe()
        assert [kind for kind, _ in world.launches] == ["execute", "execute", "graph", "graph", "graph", "graph"]
        assert len(world.graph_execs) == 2 and not world.graphs     # graphs destroyed once instantiated
        captured = [ops for ops in world.exec_ops.values()]
        assert all(ops == [("execute", ops[0][1])] for ops in captured)   # the uploads stay outside the graph
        eps = rt.denoise(np.zeros((1, *CFG.video_shape), np.float32), np.array([3.0], np.float32),
                         {"y": np.array([1], np.int32)})
        assert eps.shape == (1, *CFG.video_shape)
    assert world.loggers_created == 1 and len({id(lg) for lg in world.loggers}) == 1 and len(world.loggers) >= 4
    assert world.leaks() == {}, world.leaks()
    assert all(not s.destroyed or s.capture == "none" for s in world.streams.values())


def test_runtime_loads_engines_and_never_builds(monkeypatch, export):
    """Control flow (not numerics): opening the runtime on an export without engines builds nothing
    and says, in one line, which `vdit build` to run; after that build it opens."""
    from vdit_deploy.runtimes import open_runtime

    world = fake(monkeypatch)
    with pytest.raises(VditError, match=r"no step engine for fp16 .*run `vdit build .* --precision fp16`") as e:
        open_runtime("trt", export, precision="fp16")
    assert "\n" not in str(e.value) and world.builds == []
    with open_built(export, "fp16") as rt:
        built = len(world.builds)
        assert [f.parent.name for f in rt.files] == ["engines"] and rt.batch_range == (1, 8)
        assert len(world.builds) == built == 2 and len(rt.files) == 2   # the denoiser engine is loaded, not built
    with open_runtime("trt", export, precision="fp16") as rt:
        assert len(world.builds) == 2


@pytest.mark.parametrize("cudart_version", CUDART_VERSIONS)
def test_capture_failure_ends_capture_and_falls_back(monkeypatch, export, cudart_version):
    """Control flow (not numerics): when the engine cannot run inside a capture, the capture is ended
    (the stream leaves capture mode), nothing leaks, the step still runs eagerly, and every later
    step too; describe() says why."""

    world = fake(monkeypatch, TRT_10_3, cudart_version, fail_launch_in_capture=True)
    with open_built(export, "fp16") as rt:
        run_steps(rt, 5)
        assert not rt.cuda_graph and "no CUDA graph" in rt.describe() and "failed to run" in rt.graph_error
        assert [kind for kind, _ in world.launches] == ["execute"] * 5
        cudart = world.cudart
        assert cudart.cudaStreamIsCapturing(rt.stream) == (
            cudart.cudaError_t.cudaSuccess, cudart.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone)
        assert not world.graphs and not world.graph_execs
    assert world.leaks() == {}


@pytest.mark.parametrize("cudart_version", CUDART_VERSIONS)
def test_failed_instantiate_destroys_the_graph(monkeypatch, export, cudart_version):
    """Control flow (not numerics): cudaGraphInstantiateWithFlags failing leaves no graph behind and
    the runtime continues eagerly."""

    world = fake(monkeypatch, TRT_11, cudart_version, fail_instantiate=True)
    with open_built(export, "fp32") as rt:
        run_steps(rt, 4)
        assert not rt.cuda_graph and "cudaGraphInstantiateWithFlags failed" in rt.graph_error
        assert [kind for kind, _ in world.launches] == ["execute"] * 4 and not world.graphs
    assert world.leaks() == {}


def test_batch_outside_the_profile_and_refused_addresses(monkeypatch, export):
    """Control flow (not numerics): set_input_shape and set_tensor_address results are checked: a
    refusal is a one-line VditError, not a launch with stale shapes or addresses."""

    fake(monkeypatch)
    with open_built(export, "fp32") as rt:
        engine = rt.step_engine
        with pytest.raises(VditError, match="outside the engine"):
            engine.set_batch(engine.max_batch + 1)
        lo, hi = engine.ranges["x_t"]
        engine.ranges["x_t"] = ((0, *lo[1:]), hi)   # past vdit's own check: TensorRT's refusal must surface
        with pytest.raises(VditError, match=r"TensorRT refused shape \(0, .*\) for input x_t"):
            engine.set_batch(0)
        with pytest.raises(VditError, match="refused the device address of x_t"):
            engine.bind("x_t", 0)


@pytest.mark.parametrize("trt_version,precision", [("10.13.3.9", "fp16"), (TRT_11, "fp32")])
def test_real_tiny_export_builds_and_samples(monkeypatch, tiny_export, tmp_path, trt_version, precision):
    """API conformance and control flow (not numerics) on the real exported graphs: the build pins
    every LayerNormalization, Softmax and Pow (GELU's x**3) layer on 10.x fp16, and sample() runs the
    fused step through warm-up, capture and replay with stochastic steps."""
    import shutil

    from vdit_deploy.samplers import make_steps
    from vdit_deploy.sampling import sample

    export = shutil.copytree(tiny_export, tmp_path / "export")
    world = fake(monkeypatch, trt_version)
    with open_built(export, precision) as rt:
        steps = make_steps(rt.schedule, "ddim", 5, eta=1.0)   # eta 1: stochastic steps upload noise
        video = sample(rt, rt.contract, [0, 1], steps, guidance=2.0, seed=0)
        assert video.shape == (2, *rt.contract.latent) and rt.cuda_graph
        assert [kind for kind, _ in world.launches] == ["execute"] * 2 + ["graph"] * 3
    assert world.leaks() == {}
    ops = [n.op_type for n in onnx.load(str(export / "step.onnx"), load_external_data=False).graph.node]
    pinned = world.builds[0]["precisions"]
    if precision == "fp16":
        assert len(pinned) == sum(op in ("LayerNormalization", "Softmax", "Pow") for op in ops) > 0
        types = world.builds[0]["layer_types"]
        assert sum(types[name] == "ELEMENTWISE" for name in pinned) == ops.count("Pow") > 0
    else:
        assert not pinned and world.builds[0]["strongly_typed"]


# ---- 3b. a text-conditioned export: profiles on the seq axis, null_<name> inputs ---------------------------
TEXT_IN = ("encoder_hidden_states", "null_encoder_hidden_states")


@pytest.mark.parametrize("version", TRT_SUPPORTED)
def test_text_export_builds_with_seq_profiles(monkeypatch, text_export, version):
    """API conformance and control flow (not numerics): `vdit build` of a text-conditioned export gives
    every dynamic axis a range in one optimization profile on every supported TensorRT: the batch on
    each batched input, the seq axis on encoder_hidden_states and on the step's null input alike (opt =
    max by default, --seq when given); the contract is in the engine's key, and a --seq outside the
    export's range is refused in one line before any build."""
    from vdit_deploy.runtimes.trt_build import build_export

    world = fake(monkeypatch, version)
    precision = "fp16" if version.startswith("11.") else "fp32"
    built = build_export(text_export, precision, batch="1:2:4", log=lambda m: None)
    assert [b.kind for b in built] == ["step", "denoiser"] and str(built[0].profile) == "1:2:4 seq=1:16:16"
    step, den = (record["profiles"] for record in world.builds)
    assert len(step) == len(den) == 1
    for name in TEXT_IN:
        assert step[0][name] == ((1, 1, 32), (2, 16, 32), (4, 16, 32))
    assert den[0]["encoder_hidden_states"] == ((1, 1, 32), (2, 16, 32), (4, 16, 32))
    assert step[0]["x_t"] == ((1, 4, 2, 8, 8), (2, 4, 2, 8, 8), (4, 4, 2, 8, 8)) and step[0]["coefs"] == ((16,),) * 3
    assert built[0].engine.key.contract == with_null(TEXT).sha256() != with_null(CLASS).sha256()
    assert built[0].engine.path.name == f"step.{precision}.b1-2-4.seq1-16-16.engine"
    again = build_export(text_export, precision, batch="1:2:4", seq="1:8:16", log=lambda m: None)
    assert all(b.built for b in again) and world.builds[-1]["profiles"][0]["encoder_hidden_states"][1] == (2, 8, 32)
    with pytest.raises(VditError, match=r"--seq 1:8:32 is outside the export's seq range 1..16") as e:
        build_export(text_export, precision, seq="1:8:32", log=lambda m: None)
    assert "\n" not in str(e.value) and len(world.builds) == 4
    with pytest.raises(VditError, match="the export has no seq axis"):
        build_export(write_graphs(text_export.parent / "class", CLASS), "fp32", seq="1:2:4", log=lambda m: None)
    from vdit_deploy.cli import main

    cached = CliRunner().invoke(main, ["build", str(text_export), "--precision", precision, "--batch", "1:2:4",
                                       "--seq", "1:8:16", "--no-build"])
    assert cached.exit_code == 0 and cached.stdout.count("batch 1:2:4 seq=1:8:16, cached") == 2, cached.output
    other = CliRunner().invoke(main, ["build", str(text_export), "--precision", precision, "--batch", "1:2:4",
                                      "--seq", "1:4:16", "--no-build"])
    assert other.exit_code == 1 and re.search(r"profile: cached 1:2:4 seq=1:\d+:16, now 1:2:4 seq=1:4:16", other.output)


@pytest.mark.parametrize("trt_version", [TRT_10_3, TRT_11])
def test_text_runtime_denoise_and_step(monkeypatch, text_export, trt_version):
    """Control flow (not numerics): TrtRuntime on a text-conditioned export sets every dynamic input's
    shape (batch and seq) before a run, gives denoise() the 2C-channel output, feeds step.onnx's
    null_encoder_hidden_states from null_cond.safetensors (uploaded once per shape, the prompt every
    step), recaptures its graphs when the seq length changes, and names the seq axis when a prompt is
    longer than the engine's profile or than the null conditioning."""
    from vdit_deploy.contract import NULL_FILE

    world = fake(monkeypatch, trt_version)
    rng = np.random.default_rng(0)
    prompt = lambda b, seq: {"encoder_hidden_states": rng.standard_normal((b, seq, 32), dtype=np.float32)}  # noqa: E731
    with open_built(text_export, "fp32" if trt_version == TRT_10_3 else "fp16") as rt:
        assert rt.contract == with_null(TEXT) and rt.null["encoder_hidden_states"].shape == (1, 16, 32)
        out = rt.denoise(np.zeros((3, 4, 2, 8, 8), np.float32), np.full(3, 5.0, np.float32), prompt(3, 7))
        assert out.shape == (3, 8, 2, 8, 8)
        assert rt.denoiser.context._fake["shapes"]["encoder_hidden_states"] == (3, 7, 32)
        engine = rt.step_engine
        null_ptr, cond_ptr = engine.buffers["null_encoder_hidden_states"], engine.buffers["encoder_hidden_states"]
        cond = prompt(2, 16)
        run_steps(rt, 4, cond=cond)
        shapes = engine.context._fake["shapes"]
        assert all(shapes[name] == (2, 16, 32) for name in TEXT_IN) and shapes["x_t"] == (2, 4, 2, 8, 8)
        uploads = [ptr for ptr, _ in world.uploads]
        assert uploads.count(null_ptr) == 1 and uploads.count(cond_ptr) == 4
        assert [kind for kind, _ in world.launches][-4:] == ["execute", "execute", "graph", "graph"]
        assert "\n" not in rt.describe()
        with pytest.raises(VditError, match="null conditioning's encoder_hidden_states is .1, 16, 32., the prompt's "
                                            ".2, 9, 32.: make both with the same length"):
            run_steps(rt, 1, cond=prompt(2, 9))
        run_steps(rt, 1, cond=cond)   # the refused step changed nothing
        with pytest.raises(VditError, match="seq = 17, outside 1..16"):
            run_steps(rt, 1, cond=prompt(2, 17))
        lo, hi = engine.ranges["encoder_hidden_states"]
        engine.ranges["encoder_hidden_states"] = (lo, (4, 12, 32))   # an engine built with --seq 1:12:12
        with pytest.raises(VditError, match=r"encoder_hidden_states has seq = 16, outside the engine .*'s profile "
                                            r"1..12; rebuild with `vdit build --seq MIN:OPT:MAX`"):
            engine.set_shapes({"encoder_hidden_states": (3, 16, 32)})
    assert world.leaks() == {}
    (text_export / NULL_FILE).unlink()
    with pytest.raises(VditError, match="no null_cond.safetensors"):
        open_built(text_export, "fp32")


def test_real_text_export_builds_and_samples(monkeypatch, tiny_latte_export, tmp_path):
    """API conformance and control flow (not numerics) on the graphs `vdit export` makes of a diffusers
    Latte (text-conditioned, learned sigma): both engines build with the seq axis in the profile on
    TensorRT 10.x fp16 (LayerNorm, Softmax, Pow pinned), and a guided DDIM sample with eta 1 (stochastic
    steps: noise uploads) runs through warm-up, capture and replay; denoise() takes a shorter prompt."""
    import shutil

    from vdit_deploy.samplers import make_steps
    from vdit_deploy.sampling import sample

    export = shutil.copytree(tiny_latte_export, tmp_path / "export")
    world = fake(monkeypatch, "10.13.3.9")
    with open_built(export, "fp16") as rt:
        assert world.builds[0]["profiles"][0]["null_encoder_hidden_states"][2][1] == rt.contract.axes["seq"][1]
        steps = make_steps(rt.schedule, "ddim", 4, eta=1.0, learned_variance=False)
        cond = {"encoder_hidden_states": np.ones((2, *rt.null["encoder_hidden_states"].shape[1:]), np.float32)}
        video = sample(rt, rt.contract, cond, steps, guidance=2.0, seed=0)
        assert video.shape == (2, *rt.contract.latent) and rt.cuda_graph
        assert [kind for kind, _ in world.launches] == ["execute"] * 2 + ["graph"] * 2
        assert rt.denoise(np.zeros((1, *rt.contract.latent), np.float32), np.ones(1, np.float32),
                          {"encoder_hidden_states": cond["encoder_hidden_states"][:1, :5]}).shape[1] == 8
    assert world.leaks() == {}
    assert world.builds[0]["precisions"]   # fp16 on 10.x: overflow-prone layers pinned


def test_cli_build_and_no_build(monkeypatch, export):
    """Control flow (not numerics): `vdit build` builds both engines, then `--no-build` finds them
    cached, and a different profile with --no-build fails in one line naming it."""
    from vdit_deploy.cli import main

    fake(monkeypatch)
    first = CliRunner().invoke(main, ["build", str(export), "--precision", "fp16", "--batch", "1:2:4"])
    assert first.exit_code == 0, first.output
    assert first.stdout.count("built in") == 2
    again = CliRunner().invoke(main, ["build", str(export), "--precision", "fp16", "--batch", "1:2:4", "--no-build"])
    assert again.exit_code == 0 and again.stdout.count("cached, up to date") == 2, again.output
    other = CliRunner().invoke(main, ["build", str(export), "--precision", "fp16", "--batch", "1:1:2", "--no-build"])
    assert other.exit_code == 1 and other.output.startswith("Error: ") and "profile: cached 1:2:4" in other.output


def test_every_tensorrt_name_is_exercised(monkeypatch, export, tmp_path):
    """API conformance (not numerics): running every build path and the runtime against each
    supported TensorRT touches each `trt.X[.Y]` the source names in at least one version, and never
    one a version lacks (the fake would raise): so every version-specific name sits behind a guard."""
    from vdit_deploy.runtimes.trt_network import BuildOptions, build_engine

    calib = calibration_set(tmp_path / "calib", n=2)
    used = set()
    for version in TRT_SUPPORTED:
        with monkeypatch.context() as m:
            world = install(m, version, "12.9.10", World())
            for precision in ("fp32", "fp16", "int8", "best"):
                build(export, precision, timing_cache=tmp_path / f"{version}.cache")
            build_engine(export / "step.onnx", "fp32", PROFILE, BuildOptions(workspace_mb=8, opt_level=1, dla_core=0), progress=True,
                         log=lambda msg: None)
            if not version.startswith("11."):
                (tmp_path / "step.calib.cache").unlink(missing_ok=True)
                build_engine(export / "step.onnx", "int8", PROFILE, calibration=calib,
                             timing_cache=tmp_path / "t.cache", progress=False, log=lambda msg: None)
            with open_built(export, "fp32") as rt:
                run_steps(rt, 4)
            used |= {name.removeprefix("tensorrt.") for name in world.used}
    _, names, _ = source_calls()
    never = sorted({n for _, _, n in names} - used)
    assert not never, f"named in the source but never reached against any fake TensorRT: {never}"


# ---- 4. imports: versions, missing libraries --------------------------------------------------------------
@pytest.mark.parametrize("version", TRT_UNSUPPORTED)
def test_tensorrt_8_is_refused_in_one_line(monkeypatch, version):
    """Control flow (not numerics): TensorRT 8.x (JetPack 5) is not supported, and says so."""
    fake(monkeypatch, version)
    with pytest.raises(VditError, match=rf"TensorRT {re.escape(version)} is not supported: .*>= 10") as e:
        import_tensorrt()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("error", ["ImportError", "OSError", "ModuleNotFoundError"])
def test_bindings_without_libraries(monkeypatch, tmp_path, error):
    """Control flow (not numerics): TensorRT's bindings present but libnvinfer missing (ImportError
    or OSError from the loader, or a missing tensorrt_libs) is told apart from no TensorRT at all,
    in import_tensorrt and in the GPU tests' skip reason."""
    import sys

    import conftest

    package = tmp_path / "tensorrt"
    package.mkdir()
    raise_ = {"ImportError": 'raise ImportError("libnvinfer.so.10: cannot open shared object file")',
              "OSError": 'raise OSError("libnvinfer.so.10: cannot open shared object file")',
              "ModuleNotFoundError": "import tensorrt_libs_that_are_not_here"}[error]
    (package / "__init__.py").write_text(raise_ + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    with pytest.raises(VditError, match="bindings are installed but its libraries did not load") as e:
        import_tensorrt()
    assert "\n" not in str(e.value)
    monkeypatch.setattr(conftest, "has_nvidia_gpu", lambda: True)
    assert "libraries did not load" in conftest.trt_skip_reason()
    package.rename(tmp_path / "elsewhere")
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    with pytest.raises(VditError, match="TensorRT is not installed"):
        import_tensorrt()


def test_fake_is_strict():
    """The fake itself: unknown names, wrong arity, wrong types and read-only writes raise, as the
    real bindings do (else the tests above would prove nothing)."""
    world = World()
    trt = trt_fake.make_tensorrt(TRT_10_3, world)
    world.trt = trt
    with pytest.raises(AttributeError):
        trt.build_engine
    with pytest.raises(AttributeError):
        trt.BuilderFlag.NOT_A_FLAG
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        trt.Builder()
    config = builder.create_builder_config()
    with pytest.raises(TypeError):
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatches=False)   # misspelt keyword
    with pytest.raises(TypeError):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1.5)                   # float for int
    with pytest.raises(TypeError):
        config.set_flag(1)                                                                # int for BuilderFlag
    with pytest.raises(AttributeError):
        config.num_optimization_profiles = 2                                              # read-only
    with pytest.raises(AttributeError):
        config.no_such_setting = 1
    cudart = trt_fake.make_cudart("11.8.7", world)
    with pytest.raises(TypeError, match="missing required arguments: bufferSize"):
        cudart.cudaGraphInstantiate(None, 0)
    err, ptr = cudart.cudaMalloc(16)
    assert int(err) == 0 and cudart.cudaFree(ptr) == (cudart.cudaError_t.cudaSuccess,)
    assert trt_fake.__doc__.count("never stands in for a GPU test") == 1
