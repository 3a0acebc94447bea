"""INT8 types per instruction set (runtimes/cpu_isa.py): detection, the choice for each target, what
the graph records, and the runtime's warning when a graph's types saturate on the CPU it runs on."""
import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from vdit_deploy.calibration.int8 import quantize_int8
from vdit_deploy.cli import main
from vdit_deploy.errors import VditError
from vdit_deploy.runtimes.cpu_isa import (ISAS, META_KEY, TARGETS, choose, detect_isa, host_isa, read_choice,
                                          saturation_warning)

ICELAKE = {"AVX2": True, "AVX512F": True, "AVX512BW": True, "AVX512VNNI": True}
SKYLAKE_SP = {"AVX2": True, "AVX512F": True, "AVX512BW": True, "AVX512VNNI": False}   # AVX-512, no VNNI
EPYC_ZEN2 = {"AVX2": True, "AVX512F": False}


@pytest.mark.parametrize("features,flags,machine,isa", [
    (ICELAKE, {"avx2", "avx512f", "avx512_vnni"}, "x86_64", "vnni"),
    (SKYLAKE_SP, {"avx2", "avx512f"}, "x86_64", "avx2"),         # VPMADDUBSW on AVX-512 saturates too
    (EPYC_ZEN2, {"avx2"}, "x86_64", "avx2"),                     # the AMD EPYC
    (EPYC_ZEN2, {"avx2", "avx_vnni"}, "x86_64", "vnni"),         # AVX-VNNI: cpuid leaf 7.1, from /proc/cpuinfo
    # an emulator shows the host's /proc/cpuinfo (VNNI) while cpuid says Haswell: cpuid wins
    (EPYC_ZEN2, {"avx2", "avx512f", "avx512_vnni", "avx_vnni"}, "x86_64", "avx2"),
    ({}, set(), "x86_64", "avx2"),                               # nothing known: the choice safe everywhere
    ({}, {"asimddp"}, "aarch64", "arm64"),
    ({}, set(), "arm64", "arm64"),
])
def test_detect_isa(features, flags, machine, isa):
    assert detect_isa(features, flags, machine) == isa


def test_this_machine_is_detected_as_mlas_sees_it():
    from vdit_deploy.runtimes.cpu_isa import _cpuinfo_flags, _numpy_features

    isa, flags = host_isa(), _cpuinfo_flags()
    assert isa in ("vnni", "avx2", "arm64")
    if "avx512_vnni" in flags and _numpy_features().get("AVX512VNNI"):
        assert isa == "vnni"
    if flags and not {"avx512_vnni", "avx_vnni", "amx_int8", "asimd"} & flags:
        assert isa == "avx2"


def test_choice_per_target():
    # VNNI and arm64 sum u8 x s8 in 32 bits: full-range weights. AVX2 pairs them in 16 bits: 7-bit weights.
    assert [choose("dynamic", t).reduce_range for t in ("vnni", "avx2", "arm64")] == [False, True, False]
    assert {choose("dynamic", t).activation_type for t in ("vnni", "avx2", "arm64")} == {"uint8"}
    # Q/DQ: asymmetric u8 activations on a CPU; symmetric S8S8 for TensorRT (its explicit quantization)
    assert {t: (c.weight_type, c.activation_type, c.activation_symmetric) for t, c in TARGETS["qdq"].items()} == {
        "vnni": ("int8", "uint8", False), "avx2": ("int8", "uint8", False), "arm64": ("int8", "uint8", False),
        "tensorrt": ("int8", "int8", True)}
    assert "asymmetric activations" in choose("qdq", "avx2").describe()
    assert choose("qdq", "tensorrt").reduce_range is False and choose("qdq", "avx2").reduce_range is True
    assert choose("dynamic", "avx2").saturation_safe and not choose("dynamic", "vnni").saturation_safe
    assert choose("dynamic") == choose("dynamic", host_isa())
    # a board profile: TensorRT builds its Q/DQ graph; a Jetson's CPU is arm64
    assert choose("qdq", "orin-nano").target == "tensorrt"
    assert choose("dynamic", "agx-orin").target == "arm64"
    with pytest.raises(VditError, match="GPU build"):
        choose("dynamic", "desktop-gpu")
    with pytest.raises(VditError, match="GPU build"):
        choose("dynamic", "tensorrt")
    with pytest.raises(VditError, match="INT8 target must be one of"):
        choose("dynamic", "avx9")


@pytest.fixture(scope="module")
def export(tiny_export, tmp_path_factory):
    return shutil.copytree(tiny_export, tmp_path_factory.mktemp("isa") / "export")


def quantized_weights(path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    return [onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_quantized")]


@pytest.mark.parametrize("target", ISAS)
def test_graph_records_its_types_and_weights_fit_them(export, target):
    """Each ISA's dynamic graph: the choice in its metadata, and weights in the range that choice
    promises (full-range s8 on VNNI and arm64; 7 bits on AVX2: a pair of u8 x s7 products fits 16 bits,
    2 * 255 * 64 < 32768), whatever CPU makes it."""
    path = quantize_int8(export, target=target, out=export / f"{target}.onnx")
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    choice = choose("dynamic", target)
    assert read_choice(props) == json.loads(choice.to_json())
    weights = quantized_weights(path)
    assert weights and all(w.dtype == np.int8 for w in weights)
    peak = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert (peak <= 64) if choice.reduce_range else (peak == 127)
    assert choice.saturation_safe == (target == "avx2")       # only AVX2 needs it: the others sum in 32 bits


def test_runtime_warns_once_when_the_graph_saturates_here(export, capsys):
    from vdit_deploy.runtimes.ort_runtime import OrtRuntime

    vnni = json.loads(choose("dynamic", "vnni").to_json())
    made = {META_KEY: json.dumps(vnni)}
    line = saturation_warning(made, "int8-dynamic", isa="avx2")
    assert line.startswith("warning:") and "\n" not in line and "--target avx2" in line
    assert saturation_warning(made, "int8-dynamic", isa="vnni") is None
    assert saturation_warning(made, "int8-dynamic", isa="arm64") is None
    assert saturation_warning({META_KEY: choose("dynamic", "avx2").to_json()}, "int8-dynamic", isa="avx2") is None
    assert saturation_warning({}, "int8-dynamic", isa="avx2")       # made before the record: full-range weights
    assert saturation_warning(made, "fp32", isa="avx2") is None

    quantize_int8(export, target="vnni")                            # the graph `--precision int8` loads
    capsys.readouterr()
    with OrtRuntime(export, "int8", providers=["cpu"]) as rt:
        err = capsys.readouterr().err
        assert bool(rt.warnings) == (host_isa() == "avx2")
        assert err.count("warning:") == (1 if host_isa() == "avx2" else 0)
    quantize_int8(export, target="avx2")                            # safe everywhere: never warns
    with OrtRuntime(export, "int8", providers=["cpu"]) as rt:
        assert rt.warnings == [] and "warning" not in capsys.readouterr().err


def test_cli_target(export, tmp_path):
    result = CliRunner().invoke(main, ["calibrate", "int8", str(export), "--target", "avx2"])
    assert result.exit_code == 0, result.output
    assert "7-bit weights (reduce_range) for avx2" in result.output
    before = sorted(p.name for p in export.iterdir())
    result = CliRunner().invoke(main, ["calibrate", "int8", str(export), "--target", "sse9"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "Error: INT8 target" in result.output
    assert sorted(p.name for p in export.iterdir()) == before      # refused before any work


def test_verify_and_report_exit_1_when_a_variant_misses(export, tiny_checkpoint, tmp_path):
    """A variant off its tolerance (here: an 'int8' graph with every matrix 50 % off) fails `vdit verify`
    and `vdit calibrate report`, each with one Error line and exit 1."""
    from vdit_deploy.calibration.fp16 import save_variant
    from vdit_deploy.calibration.int8 import variant_path
    from vdit_deploy.export.variants import INT8_DYNAMIC

    made_here = shutil.ignore_patterns("*int8*", "*.fp16.*", *(f"{isa}*" for isa in ISAS))
    bad = shutil.copytree(export, tmp_path / "bad", ignore=made_here)
    model = onnx.load(str(bad / "denoiser.onnx"))
    for weight in model.graph.initializer:                      # every matrix 50 % off
        if len(weight.dims) == 2:
            arr = onnx.numpy_helper.to_array(weight) * np.float32(1.5)
            weight.CopyFrom(onnx.numpy_helper.from_array(arr, weight.name))
    save_variant(model, variant_path(bad, "dynamic"), INT8_DYNAMIC)
    result = CliRunner().invoke(main, ["verify", str(bad), "--checkpoint", str(tiny_checkpoint)])
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1].startswith("Error: ")
    assert "denoiser.int8-dynamic.onnx out error" in result.output
    assert "Traceback" not in result.output
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["calibrate", "report", str(bad), "--precisions", "int8", "--steps", "4",
                                       "--seeds", "1", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "MISSED" in result.output and result.output.splitlines()[-1] == \
        f"Error: int8 missed the PSNR target against fp32 (report in {out})"
    assert (out / "report.json").is_file()                          # the report is written before the verdict


def test_full_range_qdq_graph_runs_exact_on_a_saturating_cpu(export, tmp_path, capsys):
    """A Q/DQ graph made for TensorRT (full-range int8 weights) on this CPU: where its fused u8 x s8
    kernels saturate (AVX2), the runtime runs the Q/DQ pairs unfused, with a one-line note, and matches
    the graph's own arithmetic (ONNX Runtime with every fusion off: QuantizeLinear, DequantizeLinear and
    float MatMul as the ONNX spec writes them); the fused session is far off there. Elsewhere the fused
    kernels sum in 32 bits and match it too."""
    import onnxruntime as ort

    from vdit_deploy.calibration.collect import collect
    from vdit_deploy.calibration.int8 import variant_path
    from vdit_deploy.runtimes.ort_runtime import OrtRuntime

    work = shutil.copytree(export, tmp_path / "export", ignore=shutil.ignore_patterns("*int8*", "*.fp16.*"))
    # float_steps=0: the call below mixes t = 900 and 30, and every row is to run the INT8 graph
    quantize_int8(work, collect(work, tmp_path / "calib", seeds=range(1)), mode="qdq", target="tensorrt", float_steps=0)
    capsys.readouterr()
    rng = np.random.default_rng(0)
    with OrtRuntime(work, "int8-qdq", providers=["cpu"]) as rt:
        feeds = {"x_t": rng.standard_normal((2, *rt.contract.latent), dtype=np.float32),
                 "t": np.array([900, 30]), "y": np.array([1, 2])}
        got = rt.graph.run(**feeds)
        saturates = host_isa() == "avx2"
        assert rt.graph.unfused == saturates
        err = capsys.readouterr().err
        assert ("note:" in err and "unfused" in err and err.count("\n") == 1) if saturates else err == ""
        feeds = rt.graph.feeds(**feeds)
    path = variant_path(work, "qdq")

    def session(level):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    spec = session(ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, feeds)[0]
    fused = session(ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, feeds)[0]
    rel = lambda a: float(np.linalg.norm(a - spec) / np.linalg.norm(spec))
    assert rel(got) < 1e-3, rel(got)     # other fusions (LayerNorm, GELU) round differently: ~5e-5
    if saturates:
        assert rel(fused) > max(1e-3, 10 * rel(got)), rel(fused)    # what the runtime avoids: 5e-3 here


def test_cpu_qdq_graph_is_asymmetric_and_tensorrt_refuses_it(export, tmp_path):
    """The default (CPU) Q/DQ graph's activations have zero points fitted to their ranges (a post-GELU
    input is skewed: not 128), the TensorRT one's are 0; a TensorRT build refuses the CPU graph in one
    line before it imports TensorRT, and builds nothing."""
    from vdit_deploy.calibration.collect import collect
    from vdit_deploy.runtimes.cpu_isa import tensorrt_refusal
    from vdit_deploy.runtimes.trt_network import build_engine

    work = shutil.copytree(export, tmp_path / "export", ignore=shutil.ignore_patterns("*int8*", "*.fp16.*"))
    calib = collect(work, tmp_path / "calib", seeds=range(1))
    cpu = quantize_int8(work, calib, mode="qdq", target="avx2", out=work / "cpu.onnx")
    trt = quantize_int8(work, calib, mode="qdq", target="tensorrt", out=work / "trt.onnx")

    def zero_points(path):
        model = onnx.load(str(path))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        return [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]

    cpu_zp, trt_zp = zero_points(cpu), zero_points(trt)
    assert cpu_zp and all(z.dtype == np.uint8 for z in cpu_zp) and len({int(z) for z in cpu_zp}) > 2
    assert trt_zp and all(z.dtype == np.int8 and int(z) == 0 for z in trt_zp)
    props = lambda path: {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert tensorrt_refusal(props(trt), trt.name) is None
    assert tensorrt_refusal(props(work / "denoiser.onnx"), "denoiser.onnx") is None
    line = tensorrt_refusal(props(cpu), cpu.name)
    assert "\n" not in line and "--target tensorrt" in line and "avx2" in line
    with pytest.raises(VditError, match="TensorRT takes symmetric int8 only"):
        build_engine(cpu, "int8", None)
