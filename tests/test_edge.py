"""Edge and scale: deployment profiles, the memory planner, the Triton model repository, and the
torch-free import path (an edge box samples from an export without torch)."""
import json
import os
import py_compile
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vdit_deploy.cli import main
from vdit_deploy.config import PRESETS, preset
from vdit_deploy.errors import VditError
from vdit_deploy.runtimes.profiles import (DLA_UNSUPPORTED, PROFILE_DIR, WEIGHT_BYTES, activation_elements,
                                           load_profile, plan_memory, profile_names)

TARGETS = ("orin-nano", "orin-nx", "agx-orin", "desktop-gpu")
ROOT = Path(__file__).resolve().parents[1]


# ---- profiles -----------------------------------------------------------------------------------
def test_shipped_profiles_load():
    assert set(TARGETS) <= set(profile_names())
    for name in TARGETS:
        p = load_profile(name)
        assert p.name == name and p.usable_bytes > 0 and p.workspace_mib > 0
        if name != "desktop-gpu":   # Jetson: one memory for CPU and GPU, fixed shapes, batch 1
            assert p.unified_memory and p.batch == (1, 1, 1) and p.fixed_shapes
    assert load_profile("orin-nano").dla_cores == 0
    assert load_profile("agx-orin").dla_cores == 2
    seq = load_profile(_write_any("agx-orin", axes={"seq": 120}))
    assert seq.axes == {"seq": (120, 120, 120)} and "seq        120:120:120 (fixed)" in seq.describe()


def _write_any(name, **changes):
    import tempfile

    return _write(Path(tempfile.mkdtemp()), name, **changes)


def _write(tmp_path, name="orin-nx", **changes):
    data = json.loads((PROFILE_DIR / f"{name}.json").read_text())
    data.update(changes)
    path = tmp_path / "board.json"
    path.write_text(json.dumps(data))
    return path


def test_edited_profile_with_dla(tmp_path):
    p = load_profile(_write(tmp_path, "agx-orin", dla_core=1, precision="int8", workspace_mib=256))
    assert (p.dla_core, p.precision, p.workspace_mib) == (1, "int8", 256)
    text = p.describe()
    assert "DLA        core 1, GPU fallback on" in text
    assert all(item in text for item in DLA_UNSUPPORTED)
    assert any("MatMul between two activations" in item for item in DLA_UNSUPPORTED)


@pytest.mark.parametrize("changes, message", [
    ({"precision": "fp8"}, "precision must be one of"),
    ({"batch": [2, 1, 1]}, "batch must be [min, opt, max]"),
    ({"batch": "1:1:1"}, "batch must be [min, opt, max]"),
    ({"memory_gib": "16"}, "memory_gib must be a number"),
    ({"reserved_gib": 99}, "reserved_gib (99) must be less than memory_gib"),
    ({"workspace_mib": 0.5}, "workspace_mib must be an integer"),
    ({"optimization_level": 7}, "optimization_level must be 0..5"),
    ({"dla_core": 2}, "dla_core 2 asked for, but orin-nx has 2 DLA core(s)"),
    ({"dla_core": 0, "precision": "fp32"}, "DLA runs fp16 or int8"),
    ({"dla_core": 0, "batch": [1, 1, 4]}, "DLA needs fixed shapes"),
    ({"gpu_fallback": "yes"}, "gpu_fallback must be true or false"),
    ({"workspace": 512}, "unknown field(s) workspace"),
    ({"axes": {"seq": [16, 1, 1]}}, "axes.seq must be [min, opt, max]"),
    ({"axes": [1, 2, 3]}, "axes must map named axes"),
    ({"dla_core": 0, "precision": "fp16", "axes": {"seq": [1, 120, 120]}}, "DLA needs fixed shapes: batch (and axes)"),
])
def test_profile_validation(tmp_path, changes, message):
    with pytest.raises(VditError) as e:
        load_profile(_write(tmp_path, **changes))
    assert message in str(e.value) and "board.json" in str(e.value) and "\n" not in str(e.value)


def test_profile_errors(tmp_path):
    with pytest.raises(VditError, match="unknown target 'orin-mega': choose from agx-orin"):
        load_profile("orin-mega")
    with pytest.raises(VditError, match="DLA core"):
        load_profile(_write(tmp_path, "orin-nano", dla_core=0))
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(VditError, match="is not valid JSON"):
        load_profile(bad)
    data = json.loads((PROFILE_DIR / "orin-nano.json").read_text())
    del data["memory_gib"]
    bad.write_text(json.dumps(data))
    with pytest.raises(VditError, match="missing field.s. memory_gib"):
        load_profile(bad)


# ---- the memory planner ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_weights_are_params_times_bytes(name):
    cfg = PRESETS[name]
    for precision, nbytes in WEIGHT_BYTES.items():
        plan = plan_memory(cfg, 1, precision, load_profile("desktop-gpu"))
        assert plan.rows[f"weights ({precision})"] == (cfg.num_params() * nbytes,) * 2


def test_estimates_are_monotone():
    board = load_profile("agx-orin")
    cfg = PRESETS["B"]
    by_batch = [plan_memory(cfg, b, "fp16", board) for b in (1, 2, 4, 8)]
    for a, b in zip(by_batch, by_batch[1:]):
        assert a.run_bytes < b.run_bytes and a.build_bytes < b.build_bytes
    by_frames = [plan_memory(cfg.replace(frames=f), 1, "fp16", board) for f in (2, 4, 8, 16)]
    for a, b in zip(by_frames, by_frames[1:]):
        assert a.run_bytes < b.run_bytes and a.build_bytes < b.build_bytes
    by_precision = [plan_memory(cfg, 2, p, board) for p in ("int8", "fp16", "fp32")]
    for a, b in zip(by_precision, by_precision[1:]):
        assert a.run_bytes < b.run_bytes and a.build_bytes < b.build_bytes
    # classifier-free guidance: the fused step runs 2B through the denoiser
    guided, plain = plan_memory(cfg, 2, "fp16", board), plan_memory(cfg, 2, "fp16", board, guidance=False)
    assert guided.engine_batch == 4 and plain.engine_batch == 2
    acts = [r for k, (r, _) in guided.rows.items() if k.startswith("activations")][0]
    assert acts == 2 * [r for k, (r, _) in plain.rows.items() if k.startswith("activations")][0]


def test_joint_attention_costs_more_activations():
    # joint attention keeps heads x N x N scores; factorized only F' x heads x S x S
    cfg = PRESETS["S"]
    f, h, w = cfg.grid
    fact, joint = activation_elements(cfg), activation_elements(cfg.replace(attention="joint"))
    assert joint["attention"] - fact["attention"] == 2 * (cfg.num_heads * cfg.num_tokens ** 2
                                                          - f * cfg.num_heads * (h * w) ** 2)
    assert fact["mlp"] == joint["mlp"]


def test_unified_memory_counts_host_copies():
    cfg = PRESETS["L"]
    jetson = plan_memory(cfg, 1, "fp16", load_profile("agx-orin"))
    assert jetson.rows["ONNX weights held by the parser"] == (0, cfg.num_params() * 4)
    assert jetson.build_bytes > jetson.run_bytes
    given = plan_memory(cfg, 1, "fp16", load_profile("agx-orin"), onnx_bytes=123)
    assert given.rows["ONNX weights held by the parser"] == (0, 123)
    discrete = plan_memory(cfg, 1, "fp16", load_profile("desktop-gpu"))
    assert "ONNX weights held by the parser" not in discrete.rows
    assert discrete.build_bytes == discrete.run_bytes


def test_xl_is_refused_on_orin_nano_with_a_suggestion():
    board = load_profile("orin-nano")
    plan = plan_memory(PRESETS["XL"], 1, "fp16", board)
    assert not plan.fits and plan.peak_bytes > board.usable_bytes
    with pytest.raises(VditError) as e:
        plan.check()
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("fp16 at batch 1 needs ~") and "orin-nano has 5.90 GiB usable" in msg
    assert "try int8 (--precision int8 after `vdit calibrate` fits)" in msg
    plan_memory(PRESETS["XL"], 1, "int8", board).check()      # the suggestion holds
    assert "does NOT fit" in plan.table()


def test_batch_suggestion_is_the_largest_that_fits():
    board = load_profile("desktop-gpu")
    cfg = PRESETS["S"].replace(attention="joint")             # N^2 scores: activations dominate
    plan = plan_memory(cfg, 256, "fp16", board)
    assert not plan.fits
    batch = int(plan.suggestions[0].split("--batch ")[1].split()[0])
    assert plan_memory(cfg, batch, "fp16", board).fits and not plan_memory(cfg, batch + 1, "fp16", board).fits
    assert "fewer frames" in plan.refusal()


@pytest.mark.parametrize("attention", ["factorized", "factorized_dot_product", "joint"])
def test_activation_estimate_matches_measured_cpu_peak(attention):
    """The estimate against the peak bytes of live intermediate tensors of a real torch forward (tiny).
    PyTorch's CPU attention does not write score matrices, so the estimate may exceed it (upper bound)."""
    torch = pytest.importorskip("torch")
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from vdit_deploy.model import VideoDiT

    class PeakLive(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.peak = {}, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.live = {k: v for k, v in self.live.items() if v[0]() is not None}   # drop freed storages
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    s = t.untyped_storage()
                    self.live.setdefault(s.data_ptr(), (weakref.ref(s), s.nbytes()))
            self.peak = max(self.peak, sum(n for _, n in self.live.values()))
            return out

    torch.manual_seed(0)
    cfg, batch = preset("tiny", attention=attention), 2
    model = VideoDiT(cfg).eval()
    x = torch.randn(batch, *cfg.video_shape)
    with torch.inference_mode(), PeakLive() as mode:
        model(x, torch.full((batch,), 500.0), torch.zeros(batch, dtype=torch.long))
    estimate = batch * max(activation_elements(cfg).values()) * 4
    assert 0.5 <= estimate / mode.peak <= 3.0, (estimate, mode.peak)


def test_cli_plan(tiny_export):
    runner = CliRunner()
    result = runner.invoke(main, ["plan", "--preset", "XL", "--target", "orin-nano"])
    assert result.exit_code == 1
    assert "weights (fp16)" in result.output and "does NOT fit" in result.output
    assert "Error: fp16 at batch 1 needs" in result.output and "try int8" in result.output
    result = runner.invoke(main, ["plan", "--onnx", str(tiny_export), "--target", "orin-nano"])
    assert result.exit_code == 0, result.output
    assert "verdict: fits" in result.output and "ONNX weights held by the parser" in result.output
    result = runner.invoke(main, ["plan", "--preset", "B", "--target", "desktop-gpu", "--batch", "2",
                                  "--precision", "int8", "--frames", "4"])
    assert result.exit_code == 0 and "4x4x32x32 video" in result.output and "batch 2 (denoiser batch 4)" in result.output
    result = runner.invoke(main, ["plan", "--list"])
    assert result.exit_code == 0 and all(t in result.output for t in TARGETS)
    result = runner.invoke(main, ["plan", "--preset", "B", "--onnx", str(tiny_export), "--target", "orin-nx"])
    assert result.exit_code == 1 and "exactly one of --preset, --checkpoint or --onnx" in result.output


def test_plan_sizes_another_architecture_from_its_graph(tiny_latte_export, tmp_path):
    """An export of another architecture (meta.config None) is planned from its graph: the weights as
    the graph holds them (the module's parameters and the constants the exporter folded), the activations by ONNX shape
    inference at the named axes' max (or the target's); --frames is refused in one line."""
    import diffusers

    from vdit_deploy.export.metadata import read_metadata
    from vdit_deploy.runtimes.profiles import GraphSize, graph_size, model_for_plan

    meta = read_metadata(tiny_latte_export / "denoiser.onnx")
    assert meta.config is None
    size, onnx_bytes, what = model_for_plan(onnx_path=tiny_latte_export)
    latte = diffusers.LatteTransformer3DModel.from_config(meta.model["config"])
    params = sum(p.numel() for p in latte.parameters())   # the graph holds these plus folded constants (pos. tables)
    assert isinstance(size, GraphSize) and params <= size.params <= 1.05 * params
    assert size.video_shape == (4, 2, 8, 8) and size.sizes == {"seq": 16} and "LatteTransformer3DModel" in what
    # one video's largest operator at 16 tokens holds at least the latent and the text embeddings
    assert size.activations >= 4 * 2 * 8 * 8 + 16 * 32
    assert graph_size(tiny_latte_export / "denoiser.onnx", {"seq": 2}).activations <= size.activations
    plan = plan_memory(size, 2, "fp16", load_profile("orin-nano"), onnx_bytes=onnx_bytes)
    assert plan.rows["weights (fp16)"] == (size.params * 2,) * 2 and plan.fits
    assert any("sized from its ONNX graph at seq 16" in n for n in plan.notes)
    result = CliRunner().invoke(main, ["plan", "--onnx", str(tiny_latte_export), "--target", "orin-nano"])
    assert result.exit_code == 0 and "verdict: fits" in result.output and "4x2x8x8 video" in result.output
    result = CliRunner().invoke(main, ["plan", "--onnx", str(tiny_latte_export), "--target", "orin-nano",
                                       "--frames", "4"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "--frames applies to the built-in" in result.output
    board = tmp_path / "board.json"
    board.write_text(json.dumps({**json.loads((PROFILE_DIR / "orin-nano.json").read_text()), "axes": {"seq": [1, 4, 4]}}))
    result = CliRunner().invoke(main, ["plan", "--onnx", str(tiny_latte_export), "--target", str(board)])
    assert result.exit_code == 0 and "at seq 4" in result.output, result.output


# ---- the Triton model repository ------------------------------------------------------------------
def parse_config(path):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                           reason="needs tritonclient (pip install 'vdit-deploy[dev]')")
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_serve_export_writes_a_valid_repository(tiny_export, tmp_path):
    from vdit_deploy.export.metadata import read_metadata

    repo = tmp_path / "models"
    result = CliRunner().invoke(main, ["serve-export", str(tiny_export), "--triton", str(repo), "--instances", "2"])
    assert result.exit_code == 0, result.output
    den = parse_config(repo / "vdit_denoiser" / "config.pbtxt")
    sam = parse_config(repo / "vdit_sampler" / "config.pbtxt")
    from tritonclient.grpc.model_config_pb2 import DataType

    meta = read_metadata(tiny_export / "denoiser.onnx")
    # denoiser: ONNX Runtime with dynamic batching up to the export's max (2 x 4 videos)
    assert den.name == "vdit_denoiser" and den.platform == "onnxruntime_onnx"
    assert den.max_batch_size == meta.batch["max"] == 8
    assert den.HasField("dynamic_batching") and den.instance_group[0].count == 2
    # every config tensor is the graph's tensor: name, dtype, per-sample dims (t and y reshaped to [B])
    check_denoiser_tensors(den, repo)
    # sampler: Python backend, the contract's conditioning as request inputs, its parameters carry what model.py needs
    assert sam.backend == "python" and sam.max_batch_size == 0
    assert [i.name for i in sam.input] == ["y", "seed", "sampler", "steps", "order", "eta", "guidance"]
    assert [i.optional for i in sam.input] == [False] + [True] * 6
    assert DataType.Name(sam.input[2].data_type) == "TYPE_STRING"
    assert list(sam.input[0].dims) == [-1] and DataType.Name(sam.input[0].data_type) == "TYPE_INT32"
    assert list(sam.output[0].dims) == [-1, *meta.contract.latent]
    check_sampler(sam, repo, tiny_export, max_videos=4)


def check_denoiser_tensors(den, repo, fixed=None):
    """Every config tensor is the graph's tensor: name, dtype, per-sample dims (-1 for a named axis;
    per-sample scalars such as t and y reshaped to [B]); a fixed-batch graph's whole dims, batch first."""
    import onnx
    from tritonclient.grpc.model_config_pb2 import DataType

    graph = onnx.load(str(repo / "vdit_denoiser" / "1" / "model.onnx"), load_external_data=False).graph
    onnx_types = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT32: "TYPE_INT32"}
    for tensors, values in ((den.input, graph.input), (den.output, graph.output)):
        assert [t.name for t in tensors] == [v.name for v in values]
        for t, v in zip(tensors, values):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            dims = dims if fixed else dims[1:]
            assert DataType.Name(t.data_type) == onnx_types[v.type.tensor_type.elem_type]
            assert (list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)) == dims
    assert [t.name for t in den.output] == ["out"]


def check_sampler(sam, repo, export, max_videos):
    """The sampler's parameters and files: the contract model.py rebuilds, the null conditioning it
    pairs each request with (the export's own file), and a model.py that compiles."""
    from vdit_deploy.contract import NULL_FILE, Contract, load_null
    from vdit_deploy.export.metadata import read_metadata

    meta = read_metadata(export / "denoiser.onnx")
    params = {k: v.string_value for k, v in sam.parameters.items()}
    assert params["denoiser"] == "vdit_denoiser" and params["max_videos"] == str(max_videos)
    contract = Contract.from_dict(json.loads(params["contract"]))
    assert contract == meta.contract and params["checkpoint_sha256"] == meta.checkpoint_sha256
    null = load_null(contract, repo / "vdit_sampler" / "1")
    assert (repo / "vdit_sampler" / "1" / NULL_FILE).read_bytes() == (export / NULL_FILE).read_bytes()
    assert set(null) == set(contract.names)
    model_py = repo / "vdit_sampler" / "1" / "model.py"
    py_compile.compile(str(model_py), doraise=True)
    assert "import SamplerModel as TritonPythonModel" in model_py.read_text()   # vdit_deploy's code, imported


def test_serve_export_text_conditioned(tiny_latte_export, tmp_path):
    """A text-conditioned export: the denoiser takes encoder_hidden_states with its token axis as -1,
    gives `out` with 2C channels; the sampler takes the embeddings (B, L, D) as a request input and
    holds the export's null conditioning (the client never sends it)."""
    from tritonclient.grpc.model_config_pb2 import DataType

    repo = tmp_path / "models"
    result = CliRunner().invoke(main, ["serve-export", str(tiny_latte_export), "--triton", str(repo)])
    assert result.exit_code == 0, result.output
    den = parse_config(repo / "vdit_denoiser" / "config.pbtxt")
    sam = parse_config(repo / "vdit_sampler" / "config.pbtxt")
    check_denoiser_tensors(den, repo)
    text = next(t for t in den.input if t.name == "encoder_hidden_states")
    assert list(text.dims) == [-1, 32] and list(den.output[0].dims) == [8, 2, 8, 8]
    assert [i.name for i in sam.input] == ["encoder_hidden_states", "seed", "sampler", "steps", "order", "eta",
                                           "guidance"]
    assert list(sam.input[0].dims) == [-1, -1, 32] and DataType.Name(sam.input[0].data_type) == "TYPE_FP32"
    assert not sam.input[0].optional
    check_sampler(sam, repo, tiny_latte_export, max_videos=4)


def test_serve_export_python_backend(tiny_export, tmp_path):
    """--backend python: the denoiser is a Python model (vdit's ORT runtime on model.onnx beside it, with the
    export's null file) that keeps dynamic batching; the sampler is the same. Engines go with tensorrt only."""
    from vdit_deploy.export.triton import write_triton_repo

    repo = tmp_path / "models"
    notes = write_triton_repo(tiny_export, repo, backend="python", sampler_instances=3)
    den = parse_config(repo / "vdit_denoiser" / "config.pbtxt")
    sam = parse_config(repo / "vdit_sampler" / "config.pbtxt")
    assert den.backend == "python" and not den.platform and den.max_batch_size == 8
    assert den.HasField("dynamic_batching") and den.instance_group[0].kind == den.instance_group[0].KIND_CPU
    check_denoiser_tensors(den, repo)
    files = repo / "vdit_denoiser" / "1"
    assert (files / "model.onnx").read_bytes() == (tiny_export / "denoiser.onnx").read_bytes()
    assert (files / "null_cond.safetensors").read_bytes() == (tiny_export / "null_cond.safetensors").read_bytes()
    py_compile.compile(str(files / "model.py"), doraise=True)
    assert "import DenoiserModel as TritonPythonModel" in (files / "model.py").read_text()
    assert sam.instance_group[0].count == 3
    check_sampler(sam, repo, tiny_export, max_videos=4)
    assert any("python backend" in n for n in notes)
    for backend, engine, message in [("tensorrt", None, "the tensorrt backend needs one"),
                                     ("python", tmp_path / "x.engine", "goes with the tensorrt backend"),
                                     ("onnx", None, "backend must be one of onnxruntime, tensorrt, python")]:
        with pytest.raises(VditError, match=message):
            write_triton_repo(tiny_export, tmp_path / "refused", backend=backend, engine=engine)
    assert not (tmp_path / "refused").exists()


def test_vdit_serve_refusals_before_starting(tiny_export, tmp_path):
    """What `vdit serve` refuses in one line before it starts anything (no nvidia-pytriton needed here):
    a directory that is no repository, a repository whose models need a backend the bundled server lacks,
    a port in use."""
    import socket

    from vdit_deploy.export.triton import write_triton_repo
    from vdit_deploy.serve import Distribution, check_repository, free_port, repository_backends

    (tmp_path / "backends" / "python").mkdir(parents=True)     # the bundled server's one backend
    dist = Distribution(tmp_path / "tritonserver", tmp_path / "backends", tmp_path / "stub", tmp_path / "libs", tmp_path)
    with pytest.raises(VditError, match="no Triton model repository there"):
        check_repository(tmp_path / "backends", dist)
    write_triton_repo(tiny_export, tmp_path / "ort", sampler_instances=1)
    assert repository_backends(tmp_path / "ort") == {"vdit_denoiser": "onnxruntime", "vdit_sampler": "python"}
    with pytest.raises(VditError, match="vdit_denoiser runs on the onnxruntime backend, which the bundled "
                                        "tritonserver lacks .it has python.: write the repository with"):
        check_repository(tmp_path / "ort", dist)
    write_triton_repo(tiny_export, tmp_path / "py", backend="python", sampler_instances=1)
    assert check_repository(tmp_path / "py", dist) == tmp_path / "py"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(VditError, match=f"cannot listen on 127.0.0.1:{port} .--grpc-port.: "):
            free_port("127.0.0.1", port, "--grpc-port")
    assert free_port() > 0


def test_vdit_serve_without_its_server_directory(tiny_export, tmp_path, monkeypatch):
    """`vdit serve` on a server directory `vdit serve-setup` has not set up (empty; a numpy 2 one):
    one line naming the setup command, exit 1, nothing started; --dir and VDIT_TRITON_DIR choose it."""
    from click.testing import CliRunner

    from vdit_deploy.cli import main
    from vdit_deploy.export.triton import write_triton_repo
    from vdit_deploy.serve import Distribution, server_dir

    write_triton_repo(tiny_export, tmp_path / "models", backend="python", sampler_instances=1)
    monkeypatch.setenv("VDIT_TRITON_DIR", str(tmp_path / "env"))
    assert server_dir() == tmp_path / "env" and server_dir(tmp_path / "opt") == tmp_path / "opt"
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "models"), "--http-port", "0", "--grpc-port", "0",
                                       "--metrics-port", "0"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert f"no tritonserver in {tmp_path / 'env'}: `vdit serve-setup` installs it there" in result.output
    site = tmp_path / "numpy2"
    stub = site / "pytriton" / "tritonserver" / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub.mkdir(parents=True)
    (stub / "triton_python_backend_stub").write_bytes(b"")
    (site / "pytriton" / "tritonserver" / "bin").mkdir()
    (site / "pytriton" / "tritonserver" / "bin" / "tritonserver").write_bytes(b"")
    (site / "numpy-2.4.6.dist-info").mkdir()
    with pytest.raises(VditError, match="has no numpy 1 for the server's Python backend"):
        Distribution.find(site)
    assert not (tmp_path / "env").exists()


@pytest.mark.parametrize("which", ["class", "text"])
def test_triton_sampling_loop_matches_vdit_sample(tiny_export, tiny_latte_export, which):
    """The loop model.py runs (sample_request over a denoise callable, paired with the null
    conditioning from the repository's null_cond.safetensors) gives the video that the ORT runtime's
    sampler gives for the same seed (there the fused step graph runs, with null_<name> inputs)."""
    from vdit_deploy.contract import load_null
    from vdit_deploy.samplers import make_steps
    from vdit_deploy.export.triton_python import sample_request
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import sample

    export = tiny_export if which == "class" else tiny_latte_export
    with open_runtime("ort", export) as rt:
        null = load_null(rt.contract, export)
        if which == "class":
            cond = {"y": np.array([1, 3], np.int32)}
        else:
            seq = null["encoder_hidden_states"].shape[1]
            cond = {"encoder_hidden_states": np.random.default_rng(0).standard_normal((2, seq, 32), dtype=np.float32)}
        served = sample_request(rt.denoise, rt.contract, cond, null, seed=7, sampler="ddim", steps=4, guidance=2.0)
        plan = make_steps(rt.schedule, "ddim", 4, prediction=rt.contract.prediction)
        direct = sample(rt, rt.contract, cond, plan, 2.0, seed=7)
        assert served.shape == (2, *rt.contract.latent)
        assert np.abs(served - np.asarray(direct)).max() < 1e-4
        five = {k: np.concatenate([v] * 3)[:5] for k, v in cond.items()}
        with pytest.raises(VditError, match="at most 4 videos per request"):
            sample_request(rt.denoise, rt.contract, five, null, max_videos=4)
        if which == "class":
            with pytest.raises(VditError, match=r"request y holds labels outside 0..4 \(4 = null\)"):
                sample_request(rt.denoise, rt.contract, {"y": np.array([9], np.int32)}, null, steps=2)
        else:
            with pytest.raises(VditError, match="the null conditioning's encoder_hidden_states is .1, 16, 32., "
                                                "the prompt's .2, 5, 32."):
                sample_request(rt.denoise, rt.contract, {"encoder_hidden_states": cond["encoder_hidden_states"][:, :5]},
                               null, steps=2)


def test_serve_export_refusals(tiny_export, tmp_path):
    import onnx

    from vdit_deploy.export.metadata import stamp
    from vdit_deploy.export.triton import write_triton_repo

    fixed = tmp_path / "fixed"
    fixed.mkdir()
    model = onnx.load(str(tiny_export / "denoiser.onnx"))
    stamp(model, {"vdit.batch": json.dumps({"fixed": 4})})   # a consistent edit: the digest re-signed
    onnx.save(model, str(fixed / "denoiser.onnx"))
    # a fixed batch of 1 or 2 is served (a guided step's rows split into whole calls); 4 would not split
    with pytest.raises(VditError, match="fixed batch of 4; a served export needs a batch range, or a fixed batch of 1 or 2"):
        write_triton_repo(fixed, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()   # nothing half-written
    with pytest.raises(VditError, match="has no denoiser.fp16.onnx"):
        write_triton_repo(tiny_export, tmp_path / "repo", precision="fp16")


def test_serve_export_engine_config_from_manifest(tiny_export, tmp_path):
    """--engine: the TensorRT platform and batch limit come from the `vdit build` manifest. The bytes
    stored here are a placeholder (nothing runs them): this checks the repository layout and config."""
    from vdit_deploy.export.triton import write_triton_repo
    from vdit_deploy.runtimes.engine_cache import EngineCache, EngineKey

    cache = EngineCache(tmp_path / "engines")
    from vdit_deploy.export.metadata import read_metadata

    contract = read_metadata(tiny_export / "denoiser.onnx").contract.sha256()
    key = dict(onnx_sha256="0" * 64, contract=contract, precision="fp16", tensorrt="10.3.0", gpu="Orin",
               compute_capability="8.7")
    good = cache.store("denoiser", EngineKey(profile="1:2:8", **key), b"placeholder")
    notes = write_triton_repo(tiny_export, tmp_path / "repo", engine=good.path)
    den = parse_config(tmp_path / "repo" / "vdit_denoiser" / "config.pbtxt")
    assert den.platform == "tensorrt_plan" and den.max_batch_size == 8
    assert den.instance_group[0].kind == den.instance_group[0].KIND_GPU
    assert (tmp_path / "repo" / "vdit_denoiser" / "1" / "model.plan").read_bytes() == b"placeholder"
    assert any("TensorRT 10.3.0" in n and "Orin" in n for n in notes)
    step = cache.store("step", EngineKey(profile="1:2:8", **key), b"placeholder")
    with pytest.raises(VditError, match="is a step engine"):
        write_triton_repo(tiny_export, tmp_path / "repo2", engine=step.path)
    narrow = cache.store("denoiser", EngineKey(profile="2:2:8", **key), b"placeholder")
    with pytest.raises(VditError, match="needs batch 1 to be allowed"):
        write_triton_repo(tiny_export, tmp_path / "repo2", engine=narrow.path)
    foreign = cache.store("denoiser", EngineKey(profile="1:2:4", **{**key, "contract": "f" * 64}), b"placeholder")
    with pytest.raises(VditError, match="built from an export of another model contract"):
        write_triton_repo(tiny_export, tmp_path / "repo2", engine=foreign.path)
    assert not (tmp_path / "repo2").exists()


# ---- the torch-free path -------------------------------------------------------------------------
TORCH_FREE_MODULES = [
    "vdit_deploy.config", "vdit_deploy.schedules", "vdit_deploy.samplers", "vdit_deploy.sampling", "vdit_deploy.checkpoint",
    "vdit_deploy.video", "vdit_deploy.cli", "vdit_deploy.runtimes", "vdit_deploy.runtimes.profiles",
    "vdit_deploy.runtimes.ort_runtime", "vdit_deploy.runtimes.engine_cache", "vdit_deploy.runtimes.trt_build", "vdit_deploy.runtimes.trt_network",
    "vdit_deploy.runtimes.trt_runtime", "vdit_deploy.export.metadata", "vdit_deploy.export.triton",
    "vdit_deploy.export.triton_python", "vdit_deploy.serve",
]


def source_file(module: str) -> Path:
    """vdit_deploy.runtimes.x -> runtimes/x.py (the package-dir mapping in pyproject.toml)."""
    parts = module.split(".")[1:] or ["__init__"]
    if parts[0] in ("runtimes", "export", "calibration"):
        return ROOT.joinpath(*parts[:-1], parts[-1] + ".py") if len(parts) > 1 else ROOT / parts[0] / "__init__.py"
    return ROOT.joinpath("vdit_deploy", *parts[:-1], parts[-1] + ".py")


def run_without_torch(tmp_path, code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python where `import torch` fails, as on an edge box without it."""
    fake = tmp_path / "no_torch" / "torch"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text('raise ImportError("torch is not installed on this edge box")\n')
    env = dict(os.environ, PYTHONPATH=str(fake.parent))   # first on the path: shadows the real torch
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300)


def test_edge_modules_import_without_torch(tmp_path):
    modules = [m for m in TORCH_FREE_MODULES if source_file(m).is_file()]   # those written so far
    assert len(modules) >= 12
    result = run_without_torch(tmp_path, f"""
        import importlib, sys
        failed = []
        for name in {modules!r}:
            try:
                importlib.import_module(name)
            except ImportError as e:
                failed.append(f"{{name}}: {{e}}")
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("FAILED", failed)
        print("TORCH", loaded)
    """)
    assert result.returncode == 0, result.stderr
    assert "FAILED []" in result.stdout and "TORCH []" in result.stdout, result.stdout


def test_plan_serve_and_sample_without_torch(tiny_export, tmp_path):
    repo = tmp_path / "models"
    result = run_without_torch(tmp_path, f"""
        import sys
        import numpy as np
        from click.testing import CliRunner
        from vdit_deploy.cli import main
        r = CliRunner().invoke(main, ["plan", "--onnx", {str(tiny_export)!r}, "--target", "orin-nano"])
        print("PLAN", r.exit_code, "verdict: fits" in r.output)
        r = CliRunner().invoke(main, ["serve-export", {str(tiny_export)!r}, "--triton", {str(repo)!r}])
        print("SERVE", r.exit_code)
        from vdit_deploy.export.triton_python import sample_request
        from vdit_deploy.runtimes import open_runtime
        with open_runtime("ort", {str(tiny_export)!r}) as rt:
            video = sample_request(rt.denoise, rt.contract, {{"y": np.array([0], np.int32)}}, rt.null, seed=1, steps=2)
        print("VIDEO", video.shape, bool(np.isfinite(video).all()))
        print("TORCH", sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
    """)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "PLAN 0 True" in out and "SERVE 0" in out and "TORCH []" in out, out
    assert "VIDEO (1, 3, 8, 16, 16) True" in out, out
    assert (repo / "vdit_sampler" / "1" / "model.py").is_file()
