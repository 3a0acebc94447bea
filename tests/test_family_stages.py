"""Every stage after export, per family, on the tiny models of tests/family_models.py (conftest's
flow_family: Wan, LTX-Video, Mochi, HunyuanVideo; and CogVideoX): `vdit info` with no options,
`calibrate collect` + `fp16` + `int8` (dynamic), `compare` (ort:fp32 against torch), `plan`,
`serve-export` (onnxruntime and python backends) and `build` through the strict TensorRT fakes
(tests/trt_fake.py: API conformance and the profiles over each family's dynamic axes, not numerics)."""
import re

import numpy as np
import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.slow
pytest.importorskip("diffusers", reason="pip install 'vdit-deploy[dev]' for the diffusers model tests")
from family_models import SEQ  # noqa: E402


def cli(*args):
    from vdit_deploy.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    return result.output


def cond_file(export, path, rows: int = 1):
    """Prompt rows as a user passes them (--cond): the contract's example conditioning."""
    from safetensors.numpy import save_file

    from vdit_deploy.export.metadata import read_metadata

    contract = read_metadata(export / "denoiser.onnx").contract
    save_file(contract.example_cond(rows, np.random.default_rng(3), {"seq": SEQ}), str(path))
    return path


@pytest.fixture(scope="module", params=["wan", "ltx", "mochi", "hunyuan", "cogvideox"])
def stages(request, tmp_path_factory):
    """A copy of the family's export (conftest.family_export; the stages write variants beside the
    graphs) and a --cond file."""
    import shutil

    from conftest import family_export

    name, path, export, *_ = family_export(request.param, tmp_path_factory)
    work = tmp_path_factory.mktemp(f"{name}-stages")
    copy = shutil.copytree(export, work / "export")
    return name, path, copy, cond_file(copy, work / "cond.safetensors")


def test_info_with_no_options(stages):
    """`vdit info` on the model directory and on its export: the family, what the model is fed, the
    contract (conditioning with roles) and the flow schedule, with no option."""
    name, path, export, _ = stages
    for target in (path, export):
        out = cli("info", target)
        assert re.search(rf"family\s+{name}: x_t \(B, C, F, H, W\), the model is fed", out), out
        assert "encoder_hidden_states" in out and f"output {'v' if name == 'cogvideox' else 'flow'}" in out, out
    if name in ("ltx", "mochi", "hunyuan"):
        assert "encoder_attention_mask" in cli("info", export)


def test_cli_sample_takes_the_pipeline_defaults(stages, tmp_path):
    """`vdit sample --runtime ort --onnx EXPORT --cond FILE` with no sampler or steps samples with the
    family's pipeline sampler and step count (its scheduler config): what sampler_plan(contract) gives."""
    from vdit_deploy.contract import read_cond
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import sample, sampler_plan

    name, _, export, cond = stages
    guidance = 1.0 if name == "hunyuan" else 3.0
    cli("sample", "--runtime", "ort", "--onnx", export, "--cond", cond, "--guidance", guidance, "--seed", 4,
        "--out", tmp_path / "v.npy")
    with open_runtime("ort", export) as rt:
        plan = sampler_plan(rt.contract)
        assert len(plan) == {"mochi": 64, "cogvideox": 15}.get(name, 50)
        want = sample(rt, rt.contract, read_cond(cond, rt.contract), plan, guidance, 4)
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), want, atol=1e-6)


def test_calibrate_collect_fp16_int8_and_compare(stages, tmp_path):
    """The calibration set from the export's own sampler, the fp16 and dynamic INT8 graphs from it, and
    `vdit compare` of ONNX Runtime fp32 / fp16 / int8 against the torch runtime rebuilt from the export
    (same noise and prompt): ort:fp32 equals torch."""
    import json

    name, _, export, cond = stages
    guidance = "1" if name == "hunyuan" else "2"
    calib = tmp_path / "calib"
    cli("calibrate", "collect", export, "--out", calib, "--cond", cond, "--steps", 2, "--seeds", 1, "--timesteps", 2,
        "--guidance", guidance, "--threads", 1)
    cli("calibrate", "fp16", export, "--calib", calib, "--threads", 1)
    cli("calibrate", "int8", export, "--calib", calib, "--threads", 1)
    for graph in ("denoiser.fp16.onnx", "step.fp16.onnx", "denoiser.int8-dynamic.onnx"):
        assert (export / graph).is_file(), graph
    out = cli("compare", export, "--runtimes", "torch:fp32,ort:fp32,ort:fp16,ort:int8", "--steps", 2, "--batch", 1,
              "--seeds", 0, "--repeats", 1, "--cond", cond, "--guidance", guidance, "--threads", 1,
              "--out", tmp_path / "compare")
    report = json.loads((tmp_path / "compare" / "report.json").read_text())
    assert report["reference"] == "torch:fp32" and not report["skipped"], out
    rows = {r["label"]: r for r in report["results"]}
    assert set(rows) == {"torch:fp32", "ort:fp32", "ort:fp16", "ort:int8"} and all(
        r.get("status") != "failed" for r in rows.values()), out
    assert rows["ort:fp32"]["accuracy"]["max_abs"] < 1e-4, rows["ort:fp32"]["accuracy"]
    assert all(np.isfinite(rows[k]["accuracy"]["max_abs"]) for k in ("ort:fp16", "ort:int8"))


def test_plan_sizes_the_export(stages):
    """`vdit plan --onnx EXPORT`: the engine's memory on a board from the export's graph and contract."""
    from vdit_deploy.cli import main

    from vdit_deploy.export.metadata import read_metadata

    _, _, export, _ = stages
    latent = "x".join(map(str, read_metadata(export / "denoiser.onnx").contract.latent))
    result = CliRunner().invoke(main, ["plan", "--onnx", str(export), "--target", "orin-nano", "--precision", "fp16"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert f"{latent} video" in result.output and "verdict: fits" in result.output, result.output
    assert "sized from its ONNX graph" in result.output, result.output


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_serve_export_writes_a_valid_repository(stages, tmp_path, backend):
    """The Triton repository of a family export: the denoiser's config tensors are its graph's (every
    conditioning input, the mask and the per-call scalar included), the sampler carries the contract
    and the export's null conditioning."""
    from test_edge import check_denoiser_tensors, check_sampler, parse_config

    from vdit_deploy.export.metadata import read_metadata

    name, _, export, _ = stages
    repo = tmp_path / "models"
    cli("serve-export", export, "--triton", repo, "--backend", backend)
    meta = read_metadata(export / "denoiser.onnx")
    fixed = meta.batch.get("fixed")
    assert (fixed is not None) == (name in ("ltx", "mochi"))
    sam = parse_config(repo / "vdit_sampler" / "config.pbtxt")
    assert [i.name for i in sam.input][:len(meta.contract.cond)] == [c.name for c in meta.contract.cond]
    # a fixed batch (LTX-Video, Mochi): no batching; the sampler calls it `fixed` rows at a time
    params = {k: v.string_value for k, v in sam.parameters.items()}
    assert params.get("denoiser_rows") == (str(fixed) if fixed else None)
    if backend == "onnxruntime":
        den = parse_config(repo / "vdit_denoiser" / "config.pbtxt")
        assert den.platform == "onnxruntime_onnx"
        assert (den.max_batch_size == 0 and not den.HasField("dynamic_batching")) if fixed else den.max_batch_size > 0
        check_denoiser_tensors(den, repo, fixed)
        check_sampler(sam, repo, export, max_videos=8 if fixed else max(1, meta.batch_range()[1] // 2))
    else:
        assert (repo / "vdit_denoiser" / "1" / "model.py").is_file()


def test_build_profiles_over_the_family_axes(stages, monkeypatch, tmp_path):
    """API conformance and control flow only (the strict fakes compute nothing): `vdit build` of the
    export makes one optimization profile over every dynamic axis of each graph: the batch (a fixed
    batch family's stays fixed), the seq axis on the prompt, its mask and their null_ inputs."""
    import trt_fake

    from vdit_deploy.errors import VditError
    from vdit_deploy.export.metadata import read_metadata
    from vdit_deploy.runtimes.trt_build import build_export

    name, _, export, _ = stages
    world = trt_fake.install(monkeypatch, "10.13.3.9", "12.9.10")
    meta = read_metadata(export / "step.onnx")
    lo, hi = meta.batch_range()
    built = build_export(export, "fp16", cache_dir=tmp_path / "engines", log=lambda m: None)
    assert [b.kind for b in built] == ["step", "denoiser"] and len(world.builds) == 2
    step, den = (record["profiles"] for record in world.builds)
    assert len(step) == len(den) == 1
    seq_hi = meta.contract.axes.get("seq", (0, 0))[1]
    for spec in meta.contract.cond:
        for graph, names in ((step[0], (spec.name, f"null_{spec.name}")), (den[0], (spec.name,))):
            for input_name in names:
                if input_name not in graph:
                    continue
                shapes = graph[input_name]
                assert [s[0] for s in shapes] == [lo, min(max(lo, 2), hi), hi], (input_name, shapes)
                if "seq" in spec.shape:
                    axis = spec.shape.index("seq")
                    assert shapes[0][axis] == 1 and shapes[2][axis] == seq_hi, (input_name, shapes)
    assert step[0]["x_t"][2] == (hi, *meta.contract.latent)
    if name in ("ltx", "mochi"):   # a fixed batch stays fixed; another is refused in one line
        assert lo == hi == 1
        with pytest.raises(VditError, match=r"batch 1:2:4 is outside the export's range \(a fixed batch of 1\)"):
            build_export(export, "fp16", batch="1:2:4", cache_dir=tmp_path / "engines", log=lambda m: None)
