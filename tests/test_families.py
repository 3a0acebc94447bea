"""The video DiT families vdit knows by class (vdit_deploy/families/): for each, a tiny random model saved
with save_pretrained in the pipeline layout (transformer/ + scheduler/ with the family's scheduler
config), exported with `vdit export DIR --out OUT` and nothing else, verified, sampled on ONNX Runtime
and on PyTorch, and the ONNX Runtime sample checked against the family's own diffusers pipeline loop
driving the PyTorch model. One export per family (module-scoped fixtures)."""
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow
diffusers = pytest.importorskip("diffusers", reason="pip install 'vdit-deploy[dev]' for the diffusers model tests")
from family_models import (COG_SEQ, COG_TEXT, SEQ, cogvideox_scheduler, pipeline_sample,  # noqa: E402
                           save_pipeline, tiny_cogvideox)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "vdit_deploy.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=900)


def one_line_error(result):
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def write_cond(path, **arrays):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
    return path


# ---- CogVideoX: v-prediction DDPM, (B, F, C, H, W), 5B-style RoPE table from the pipeline ---------------
@pytest.fixture(scope="module", params=[True, False], ids=["5b-rope", "2b-sincos"])
def cogvideox(request, tmp_path_factory):
    """(model dir, export dir): `vdit export DIR --out OUT`, no other option (verify included)."""
    root = tmp_path_factory.mktemp("cogvideox")
    model = save_pipeline(root, tiny_cogvideox(request.param), cogvideox_scheduler())
    out = root / "export"
    result = run_cli("export", model, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "FAIL" not in result.stdout and "step.onnx" in result.stdout
    return model, out


def test_cogvideox_info_names_layout_and_contract(cogvideox):
    model, export = cogvideox
    for path in (model, export):
        result = run_cli("info", path)
        assert result.returncode == 0, result.stderr
        assert "output v" in result.stdout and f"encoder_hidden_states: float32(batch, {COG_SEQ}, {COG_TEXT})" \
            in result.stdout, result.stdout
        assert "cogvideox" in result.stdout and "(B, F, C, H, W)" in result.stdout, result.stdout
    result = run_cli("verify", export)
    assert result.returncode == 0 and "FAIL" not in result.stdout, result.stdout + result.stderr


def test_cogvideox_samples_equal_on_ort_torch_and_the_diffusers_pipeline(cogvideox, tmp_path):
    """`vdit sample` on ORT and on torch from the same noise agree; ORT's sample equals CogVideoXPipeline's
    own loop (its scheduler, its RoPE table, its (B, F, C, H, W) latents, classifier-free guidance)
    driving the PyTorch model."""
    import math

    import torch

    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.samplers import make_steps
    from vdit_deploy.sampling import sample

    model, export = cogvideox
    rng = np.random.default_rng(1)
    prompts = rng.standard_normal((2, COG_SEQ, COG_TEXT)).astype(np.float32)
    cond = write_cond(tmp_path / "cond.safetensors", encoder_hidden_states=prompts)
    steps, guidance, seed = 6, 3.0, 5
    videos = {}
    for name, args in (("ort", ["--runtime", "ort", "--onnx", export]),
                       ("torch", ["--runtime", "torch", "--checkpoint", model, "--device", "cpu"])):
        result = run_cli("sample", *args, "--cond", cond, "--sampler", "unipc", "--spacing", "trailing", "--steps",
                         steps, "--guidance", guidance, "--seed", seed, "--out", tmp_path / f"{name}.npy")
        assert result.returncode == 0, result.stderr
        videos[name] = np.load(tmp_path / f"{name}.npy")
    assert videos["ort"].shape == (2, 4, 3, 6, 8)
    np.testing.assert_allclose(videos["ort"], videos["torch"], atol=1e-4)
    assert np.abs(videos["ort"][0] - videos["ort"][1]).max() > 1e-2     # the prompt reaches the model

    # diffusers' UniPC does not clip x0; the plan here does not either (clip inf) until the schedule
    # carries the scheduler's clipping (issue 20: scheduler configs read by class)
    with open_runtime("ort", export) as rt:
        plan = make_steps(rt.contract.schedule, "unipc", steps, spacing="trailing", prediction="v", clip=math.inf)
        ours = sample(rt, rt.contract, {"encoder_hidden_states": prompts}, plan, guidance, seed)
    net = diffusers.CogVideoXTransformer3DModel.from_pretrained(model).eval()
    scheduler = diffusers.UniPCMultistepScheduler.from_pretrained(model.parent / "scheduler")
    pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=net,
                                       scheduler=scheduler)
    x_T = np.random.default_rng(seed).standard_normal(ours.shape, dtype=np.float32)   # sample()'s x_T
    with torch.no_grad():
        theirs = pipe(prompt_embeds=torch.from_numpy(prompts), negative_prompt_embeds=torch.zeros(2, COG_SEQ, COG_TEXT),
                      latents=torch.from_numpy(x_T).transpose(1, 2), num_inference_steps=steps,
                      guidance_scale=guidance, height=6 * 8, width=8 * 8, num_frames=9, output_type="latent",
                      return_dict=False)[0]
    theirs = theirs.transpose(1, 2).numpy()                               # (B, F, C, H, W) -> (B, C, F, H, W)
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-4


def test_cogvideox_2b_at_another_size_keeps_a_dynamic_batch(tmp_path):
    """CogVideoX-2B at a latent other than its config's sample size (4 x 2 x 4 x 6 against 3 x 6 x 8): its
    patch embedding recomputes the sincos table per call there, which torch.export refused; the adapter
    bakes the table for the export's latent, so the batch stays dynamic and the graph equals the model
    called at that size (diffusers computing the table itself)."""
    import torch

    from vdit_deploy.export.onnx_export import export_source
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sources import load_diffusers_source

    torch.manual_seed(0)
    model = save_pipeline(tmp_path, tiny_cogvideox(False), cogvideox_scheduler())
    notes = []
    export = export_source(load_diffusers_source(model, latent=(4, 2, 4, 6)), tmp_path / "export", batch=(1, 3),
                           log=notes.append)
    assert not any("fixed batch" in n for n in notes), notes
    rng = np.random.default_rng(0)
    with open_runtime("ort", export) as rt:
        assert rt.batch_range[1] > rt.batch_range[0] == 1 and rt.contract.latent == (4, 2, 4, 6)
        x = rng.standard_normal((2, 4, 2, 4, 6), dtype=np.float32)
        prompts = rng.standard_normal((2, COG_SEQ, COG_TEXT)).astype(np.float32)
        t = np.array([900.0, 40.0], np.float32)
        got = rt.denoise(x, t, {"encoder_hidden_states": prompts})
    net = diffusers.CogVideoXTransformer3DModel.from_pretrained(model).eval()
    with torch.no_grad():
        want = net(hidden_states=torch.from_numpy(x).transpose(1, 2), encoder_hidden_states=torch.from_numpy(prompts),
                   timestep=torch.from_numpy(t), return_dict=False)[0].transpose(1, 2).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


# ---- the flow-matching families: Wan, LTX-Video, Mochi, HunyuanVideo -------------------------------------
def test_flow_family_exports_with_no_options_and_info_describes_it(flow_family, tmp_path):
    """`vdit export DIR --out OUT` needs nothing else for a known flow family but, for a tiny model, the
    latent (the family's default is its pipeline's resolution); `vdit info` names the family, its layout
    and its flow schedule."""
    name, path, *_, latent = flow_family     # a tiny model: not its pipeline's default resolution
    result = run_cli("export", path, "--out", tmp_path / "e", "--no-verify", "--latent", ",".join(map(str, latent)))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "e" / "step.onnx").is_file() and "Traceback" not in result.stderr
    info = run_cli("info", path)
    assert info.returncode == 0, info.stderr
    assert f"family      {name}:" in info.stdout and "the model is fed" in info.stdout, info.stdout
    assert '"kind": "flow"' in info.stdout, info.stdout


def test_flow_family_graph_equals_the_pipeline_call(flow_family):
    """The exported denoiser (the adapter: layout, packing, fixed arguments, scalars) equals the diffusers
    model called as its pipeline calls it; a fixed-batch family says so in one note."""
    import torch

    from vdit_deploy.export.metadata import read_metadata
    from vdit_deploy.runtimes import open_runtime

    name, path, export, call, notes, _ = flow_family
    meta = read_metadata(export / "denoiser.onnx")
    if name in ("ltx", "mochi"):
        assert meta.batch == {"fixed": 1} and len(notes) == 1 and "fixed batch of 1" in notes[0], notes
    net = getattr(diffusers, meta.model["class"].split(":")[1]).from_pretrained(path).eval()
    rng = np.random.default_rng(0)
    with open_runtime("ort", export) as rt:
        b = rt.batch_range[0]
        cond = rt.contract.example_cond(b, rng, {"seq": SEQ})
        x = rng.standard_normal((b, *rt.contract.latent), dtype=np.float32)
        t = np.full(b, 700.0, np.float32)
        got = rt.denoise(x, t, cond)
    with torch.no_grad():
        want = call(net, torch.from_numpy(x), torch.from_numpy(t), {k: torch.from_numpy(v) for k, v in cond.items()})
    want = want.numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_flow_family_verifies_and_samples_alike_on_ort_and_torch(flow_family):
    """verify passes; the torch runtime rebuilt from the export alone (the contract's family record)
    samples what ONNX Runtime samples."""
    from vdit_deploy.export.metadata import read_metadata
    from vdit_deploy.export.verify import check, verify
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.runtimes.torch_runtime import TorchRuntime
    from vdit_deploy.sampling import sample, sampler_plan
    from vdit_deploy.sources import load_export_source

    name, path, export, *_ = flow_family
    check(verify(export, polygraphy=False), export)
    source = load_export_source(read_metadata(export / "step.onnx"), export)
    with open_runtime("ort", export) as ort_rt, TorchRuntime(None, source=source, device="cpu") as torch_rt:
        contract = ort_rt.contract
        cond = contract.example_cond(ort_rt.batch_range[0], np.random.default_rng(2), {"seq": SEQ})
        plan = sampler_plan(contract, steps=4)           # the family's own sampler, from its scheduler config
        got = sample(ort_rt, contract, cond, plan, 3.0, 1)
        want = sample(torch_rt, contract, cond, plan, 3.0, 1)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_flow_family_ort_sample_equals_its_diffusers_pipeline(flow_family):
    """ONNX Runtime's sample with the family's default sampler (read from its scheduler config: Wan's
    UniPC with flow sigmas and shift 3, LTX's dynamically shifted Euler on its pipeline's sigmas, Mochi's
    inverted Euler on linear-quadratic sigmas, Hunyuan's shift-7 Euler with embedded guidance) equals
    the family's own diffusers pipeline driving the PyTorch model from the same noise and embeddings,
    the export's null conditioning as the negative prompt."""
    from vdit_deploy.contract import load_null
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import sample, sampler_plan

    name, path, export, *_ = flow_family
    steps, seed = 4, 1
    guidance = 1.0 if name == "hunyuan" else 3.0       # Hunyuan: embedded guidance, no CFG (its pipeline's)
    with open_runtime("ort", export) as rt:
        contract = rt.contract
        cond = contract.example_cond(min(2, rt.batch_range[1]), np.random.default_rng(2), {"seq": SEQ})
        if name == "hunyuan":
            cond["embedded_guidance"][:] = 6.0
        ours = sample(rt, contract, cond, sampler_plan(contract, steps=steps), guidance, seed)
        null = load_null(contract, export)
    x_T = np.random.default_rng(seed).standard_normal(ours.shape, dtype=np.float32)    # sample()'s x_T
    theirs = pipeline_sample(name, path, x_T, cond, null, steps, guidance)
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-4
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


# ---- what the adapters rest on ---------------------------------------------------------------------------
def test_trace_failure_names_the_real_cause():
    """torch.onnx wraps the failure ("TorchExportError ... step 1/3 ... Next steps:"): the error is the
    innermost exception's first line."""
    import torch
    import torch.nn as nn

    from vdit_deploy.errors import VditError
    from vdit_deploy.export.onnx_export import _trace

    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(VditError) as e:
        _trace(DataDependent(), (torch.randn(2, 3),), ["x"], ["out"], None, 18)
    message = str(e.value)
    assert "DataDependent failed: GuardOnDataDependentSymNode: Could not guard on data-dependent" in message, message
    assert "Next steps" not in message and "\n" not in message


def test_contract_roles_and_graph_names():
    """Roles and forward arguments survive the stored form; a conditioning input may not take a step
    graph's own input name; a mask holds 0/1 and the null pass of a per-call scalar is the prompt's value."""
    from vdit_deploy.contract import BATCH, CondInput, Contract
    from vdit_deploy.errors import VditError

    cond = (CondInput("text", "float32", (BATCH, "seq", 4)), CondInput("mask", "float32", (BATCH, "seq"), role="mask"),
            CondInput("embedded_guidance", "float32", (BATCH,), role="scalar", arg="guidance"))
    contract = Contract((4, 2, 8, 8), "eps", cond, axes={"seq": (1, 6)},
                        family={"name": "hunyuan", "layout": "(B, C, F, H, W)", "args": {}})
    assert Contract.from_dict(contract.to_dict()) == contract
    with pytest.raises(VditError, match="guidance"):
        Contract((4, 2, 8, 8), "eps", (CondInput("guidance", "float32", (BATCH,)),))
    bad = contract.to_dict()
    bad["cond"][2]["name"] = "coefs"
    with pytest.raises(VditError, match="coefs"):
        Contract.from_dict(bad)
    example = contract.example_cond(3, np.random.default_rng(0), {"seq": 6})
    assert set(np.unique(example["mask"])) <= {0.0, 1.0} and (example["mask"][:, 0] == 1).all()
    with pytest.raises(VditError, match="mask"):
        contract.check_cond({**example, "mask": example["mask"] * 0.5})
    null = {"text": np.zeros((1, 6, 4), np.float32), "mask": np.ones((1, 6), np.float32),
            "embedded_guidance": np.zeros(1, np.float32)}
    rows = contract.null_batch(null, example)
    np.testing.assert_array_equal(rows["embedded_guidance"], example["embedded_guidance"])
    assert rows["text"].shape == (3, 6, 4) and not rows["text"].any()
