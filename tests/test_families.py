"""The video DiT families vdit knows by class (vdit_deploy/families/): for each, a tiny random model saved
with save_pretrained in the pipeline layout (transformer/ + scheduler/ with the family's scheduler
config), exported with `vdit export DIR --out OUT` and nothing else, verified, sampled on ONNX Runtime
and on PyTorch, and the ONNX Runtime sample checked against the family's own diffusers pipeline loop
driving the PyTorch model. One export per family (module-scoped fixtures)."""
import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow
diffusers = pytest.importorskip("diffusers", reason="pip install 'vdit-deploy[dev]' for the diffusers model tests")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "vdit_deploy.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=900)


def one_line_error(result):
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def save_pipeline(root, model, scheduler, seed: int = 0):
    """transformer/ and scheduler/ as a pipeline's save_pretrained writes them; weights moved off their
    zero initialisation (the output layers) so the output depends on every input."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / "transformer")
    scheduler.save_pretrained(root / "scheduler")
    return root / "transformer"


def write_cond(path, **arrays):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
    return path


# ---- CogVideoX: v-prediction DDPM, (B, F, C, H, W), 5B-style RoPE table from the pipeline ---------------
COG_TEXT, COG_SEQ = 16, 12


def tiny_cogvideox(rotary: bool):
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=COG_TEXT, num_layers=1, sample_width=8, sample_height=6, sample_frames=9, patch_size=2,
        max_text_seq_length=COG_SEQ, use_rotary_positional_embeddings=rotary)


def cogvideox_scheduler():
    """CogVideoX's schedule (scaled_linear 0.00085..0.012, v_prediction, trailing) in a scheduler vdit reads
    today: CogVideoXDDIMScheduler's zero terminal SNR and snr_shift_scale come with the flow-matching
    work's scheduler reading (issue 20)."""
    return diffusers.UniPCMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             prediction_type="v_prediction", timestep_spacing="trailing")


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
