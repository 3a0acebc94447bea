"""TensorRT pieces that need no GPU: the engine profile (batch and named axes), the engine cache and
its refusals, ONNX selection per precision, calibration batches, the no-GPU errors, and the torch-free
import path."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from conftest import has_nvidia_gpu
from vdit_deploy.cli import main
from vdit_deploy.config import preset
from vdit_deploy.contract import CondInput, Contract
from vdit_deploy.schedules import Schedule
from vdit_deploy.errors import VditError
from vdit_deploy.export.metadata import ExportMetadata
from vdit_deploy.runtimes import open_runtime
from vdit_deploy.runtimes.engine_cache import AxisProfile, EngineCache, EngineKey, EngineProfile
from vdit_deploy.runtimes.trt_build import onnx_digest
from vdit_deploy.runtimes.trt_network import calibration_batches, onnx_for

no_gpu = pytest.mark.skipif(has_nvidia_gpu(), reason="checks the no-GPU error path")


def key(**changes) -> EngineKey:
    fields = dict(onnx_sha256="a" * 64, contract="c" * 64, precision="fp16", profile="1:2:8", tensorrt="10.13.0.35",
                  gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0", options={"opt_level": 3})
    return EngineKey(**{**fields, **changes})


def write_export(root, cfg=None, kinds=("step", "denoiser"), suffix=""):
    """A minimal vdit export of the built-in model: Identity graphs carrying real vdit metadata (enough
    for selection/planning)."""
    cfg = cfg or preset("tiny")
    contract = Contract(latent=tuple(cfg.video_shape), output="eps", schedule=Schedule(),
                        cond=(CondInput("y", "int32", ("batch",), cfg.num_classes),))
    root.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        x = helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["batch", *cfg.video_shape])
        out = helper.make_tensor_value_info("x_prev" if kind == "step" else "out", TensorProto.FLOAT,
                                            ["batch", *cfg.video_shape])
        graph = helper.make_graph([helper.make_node("Identity", ["x_t"], [out.name])], kind, [x], [out])
        model = helper.make_model(graph)
        meta = ExportMetadata(kind, contract, {"class": "vdit_deploy.model:VideoDiT", "config": cfg.to_dict()},
                              {"inputs": [], "outputs": []}, "0" * 64,
                              batch={"min": 1, "max": 8}, precision=suffix[1:] or "fp32")
        for k, v in meta.to_props().items():
            model.metadata_props.add(key=k, value=v)
        onnx.save(model, str(root / f"{kind}{suffix}.onnx"))
    return root


# ---- engine profile -----------------------------------------------------------------------------------
def test_axis_profile_parse():
    assert AxisProfile.parse("1:2:8") == AxisProfile(1, 2, 8)
    assert AxisProfile.parse("4") == AxisProfile(4, 4, 4) and AxisProfile.parse("4").is_fixed
    assert AxisProfile.parse("1:4") == AxisProfile(1, 4, 4)
    assert str(AxisProfile.fixed(2)) == "2:2:2"
    for bad in ("1:x:8", "8:2:1", "0:1:2", "1:2:3:4", ""):
        with pytest.raises(VditError):
            AxisProfile.parse(bad)
    with pytest.raises(VditError, match="--seq takes MIN:OPT:MAX"):
        AxisProfile.parse("a:b", "--seq")


def test_engine_profile_text_and_shapes():
    p = EngineProfile.of(AxisProfile(1, 2, 8), {"seq": AxisProfile(1, 120, 120)})
    assert str(p) == "1:2:8 seq=1:120:120" and EngineProfile.parse(str(p)) == p and p.stem == "b1-2-8.seq1-120-120"
    assert str(EngineProfile.of(AxisProfile(1, 2, 8))) == "1:2:8"
    names = {"x_t": ["batch", 3, 8, 16, 16], "text": ["batch", "seq", 64]}
    shapes = p.shapes({"x_t": (-1, 3, 8, 16, 16), "t": ("batch",), "coefs": (16,), "text": (-1, -1, 64)}, names)
    assert shapes["x_t"] == ((1, 3, 8, 16, 16), (2, 3, 8, 16, 16), (8, 3, 8, 16, 16))
    assert shapes["t"] == ((1,), (2,), (8,))
    assert shapes["coefs"] == ((16,), (16,), (16,))
    assert shapes["text"] == ((1, 1, 64), (2, 120, 64), (8, 120, 64))
    with pytest.raises(VditError, match="dynamic axis 2 .* does not cover"):     # a dim no spec names
        p.shapes({"x_t": (-1, 3, -1, 16, 16)})
    with pytest.raises(VditError, match="dynamic axis frames .* does not cover"):
        p.shapes({"x_t": (-1, -1, 8, 16, 16)}, {"x_t": ["batch", "frames", 8, 16, 16]})
    p.batch.check(8)
    with pytest.raises(VditError, match="outside the engine's profile 1:2:8"):
        p.batch.check(9)


# ---- cache key and manifest --------------------------------------------------------------------------
def test_key_roundtrip_and_differences():
    k = key()
    assert EngineKey.from_dict(json.loads(json.dumps(k.to_dict()))) == k
    diffs = k.differences(key(gpu="NVIDIA A100", tensorrt="10.0.1"))
    assert [d[0] for d in diffs] == ["tensorrt", "gpu"]
    with pytest.raises(VditError):
        key(precision="int4")


def test_cache_store_and_reuse(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    stored = cache.store("step", key(), b"plan-bytes", build_seconds=1.0)
    assert stored.path.read_bytes() == b"plan-bytes"
    cached, why = cache.lookup("step", key())
    assert cached is not None and why == "" and cached.path == stored.path
    assert cache.require("step", key()).manifest["build_seconds"] == 1.0
    assert not [p for p in (tmp_path / "engines").iterdir() if p.name.startswith(".")]   # no temp files left
    manifest = json.loads(stored.path.with_suffix(".json").read_text())
    assert manifest["key"]["compute_capability"] == "9.0" and manifest["engine_bytes"] == 10


@pytest.mark.parametrize("field,value", [("onnx_sha256", "b" * 64), ("contract", "d" * 64), ("precision", "int8"),
                                         ("profile", "1:1:4"), ("profile", "1:2:8 seq=1:64:120"), ("tensorrt", "10.3.0"),
                                         ("gpu", "Orin"), ("compute_capability", "8.7")])
def test_stale_engine_refused_naming_the_field(tmp_path, field, value):
    cache = EngineCache(tmp_path)
    cache.store("step", key(), b"plan")
    cached, why = cache.lookup("step", key(**{field: value}))
    assert cached is None and f"{field}:" in why
    others = {"onnx_sha256", "contract", "precision", "profile", "tensorrt", "gpu", "compute_capability"} - {field}
    assert not any(f"{o}:" in why for o in others)
    with pytest.raises(VditError, match=f"{field}: cached") as e:
        cache.require("step", key(**{field: value}))
    assert "\n" not in str(e.value) and "without --no-build" in str(e.value)


def test_missing_corrupt_and_tampered(tmp_path):
    cache = EngineCache(tmp_path)
    assert "no cached step engine" in cache.lookup("step", key())[1]
    stored = cache.store("step", key(), b"plan")
    manifest = stored.path.with_suffix(".json")
    stored.path.write_bytes(b"plan, truncated?")
    assert "sha256 differs" in cache.lookup("step", key())[1]
    stored.path.unlink()
    assert "is missing" in cache.lookup("step", key())[1]
    for garbage in ("{not json", "[1, 2]", json.dumps({"format": 1, "engine": "x"}),
                    json.dumps({"format": 99, "key": key().to_dict(), "engine": "x", "engine_sha256": "y"})):
        manifest.write_text(garbage)
        cached, why = cache.lookup("step", key())
        assert cached is None and "is corrupt" in why and "\n" not in why
    manifest.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(VditError, match="corrupt"):
        cache.require("step", key())


def test_timing_cache_lives_in_the_cache_dir(tmp_path):
    assert EngineCache(tmp_path).timing_cache == tmp_path / "timing.cache"


# ---- ONNX selection per precision ----------------------------------------------------------------------
def test_onnx_for_precision(tmp_path):
    export = write_export(tmp_path / "exp")
    assert onnx_for(export, "step", "fp32", False).name == "step.onnx"
    assert onnx_for(export, "step", "fp16", False).name == "step.onnx"      # TRT 10: FP16 flag on fp32 graph
    assert onnx_for(export, "step", "best", False).name == "step.onnx"
    with pytest.raises(VditError, match="step.fp16.onnx"):                 # TRT 11: strongly typed only
        onnx_for(export, "step", "fp16", True)
    with pytest.raises(VditError, match="vdit calibrate"):
        onnx_for(export, "step", "int8", False)
    write_export(export, kinds=("step",), suffix=".int8")        # ONNX Runtime's dynamic INT8: not for TensorRT
    with pytest.raises(VditError, match="vdit calibrate"):
        onnx_for(export, "step", "int8", False)
    write_export(export, kinds=("step",), suffix=".int8-qdq")
    write_export(export, kinds=("step",), suffix=".fp16")
    assert onnx_for(export, "step", "int8", False).name == "step.int8-qdq.onnx"
    assert onnx_for(export, "step", "best", True).name == "step.int8-qdq.onnx"
    assert onnx_for(export, "step", "fp16", True).name == "step.fp16.onnx"
    digest = onnx_digest(export / "step.onnx")
    assert len(digest) == 64 and digest != onnx_digest(export / "denoiser.onnx")


# ---- calibration batches ----------------------------------------------------------------------------------
def test_calibration_batches(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x_t.npy", rng.standard_normal((5, 3, 2, 4, 4), dtype=np.float32))
    np.save(tmp_path / "t.npy", np.arange(5, dtype=np.float32))
    batches = list(calibration_batches(tmp_path, 2))
    assert len(batches) == 2 and batches[1]["t"].tolist() == [2.0, 3.0]     # whole batches only
    npz = tmp_path / "npz"
    npz.mkdir()
    np.savez(npz / "000.npz", x_t=np.zeros((2, 3), np.float32), t=np.ones(2, np.float32))
    assert list(calibration_batches(npz, 2))[0]["t"].tolist() == [1.0, 1.0]
    assert len(list(calibration_batches(lambda: iter([{"a": 1}, {"a": 2}]), 1))) == 2
    np.save(tmp_path / "y.npy", np.zeros(3, np.int32))
    with pytest.raises(VditError, match="different sample counts"):
        list(calibration_batches(tmp_path, 2))
    with pytest.raises(VditError, match="no .npy or .npz"):
        list(calibration_batches(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None, 1))


# ---- errors without a GPU and the CLI ------------------------------------------------------------------
@no_gpu
def test_trt_runtime_without_gpu_is_one_line(tmp_path):
    export = write_export(tmp_path / "exp")
    for name in ("trt",):
        with pytest.raises(VditError) as e:
            open_runtime(name, export, precision="fp16")
        assert "\n" not in str(e.value) and ("GPU" in str(e.value) or "install" in str(e.value))


@no_gpu
def test_cli_build_without_gpu(tmp_path):
    export = write_export(tmp_path / "exp")
    result = CliRunner().invoke(main, ["build", str(export), "--precision", "fp16", "--batch", "1:2:4"])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert not (export / "engines").exists()
    # the way on: an option that exists (build has no --runtime; sample has)
    assert "use --runtime ort" not in result.output and "vdit sample --runtime ort" in result.output
    result = CliRunner().invoke(main, ["build", str(export), "--batch", "4:2:1"])
    assert result.exit_code == 1 and "MIN <= OPT <= MAX" in result.output


def test_cli_build_target_refuses_what_does_not_fit(tmp_path):
    export = write_export(tmp_path / "exp", cfg=preset("L"))
    result = CliRunner().invoke(main, ["build", str(export), "--target", "orin-nano", "--precision", "fp32",
                                       "--batch", "8"])
    assert result.exit_code == 1, result.output
    assert "orin-nano" in result.output and "Error: " in result.output
    assert not (export / "engines").exists()


def test_trt_modules_import_no_torch():
    code = ("import sys; import vdit_deploy.runtimes.engine_cache, vdit_deploy.runtimes.trt_build, "
            "vdit_deploy.runtimes.trt_runtime; "
            "bad = [m for m in ('torch', 'tensorrt') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
