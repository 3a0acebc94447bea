"""Step caching: the policy (numpy), the head/tail split (VideoDiT and diffusers Latte), the split graphs
of `vdit export --cache-split`, and cached sampling taking the same decisions on every runtime."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from vdit_deploy.errors import VditError
from vdit_deploy.step_cache import CachePolicy, fit_poly, load_fit, rel_l1_stats, save_fit


# ---- the policy ---------------------------------------------------------------------------------------
def stats(change, mode="fbcache"):
    """Stats whose relative change is `change` (norm 1)."""
    return [change, 1.0, 0.0, 1.0] if mode == "fbcache" else [0.0, 1.0, change, 1.0]


def run(policy, changes, mode=None):
    cache = policy.start(len(changes))
    for c in changes:
        cache.decide(stats(c, mode or policy.mode))
    return cache


def test_fbcache_warmup_threshold_and_skip_cap():
    p = CachePolicy("fbcache", 0.1, warmup=2, max_skips=2)
    cache = run(p, [0.0] * 10)
    # first and last 2 full; in between at most 2 skips in a row
    assert cache.decisions == [False, False, True, True, False, True, True, False, False, False]
    assert cache.full_steps == 6 and np.isnan(cache.signals[0]) and cache.signals[2] == 0.0
    assert run(p, [0.2] * 10).decisions == [False] * 10                 # over the threshold: nothing skipped
    assert run(CachePolicy("fbcache", 0.1, warmup=0, max_skips=9), [0.05] * 4).decisions == [False, True, True, True]


def test_the_first_step_is_full_and_a_zero_reference_never_skips():
    cache = CachePolicy("fbcache", 1e9, warmup=0, max_skips=9).start(3)
    assert cache.decide([0.0, 0.0, 0.0, 0.0]) is False                  # nothing cached yet
    assert cache.decide([1.0, 0.0, 1.0, 0.0]) is False                  # no reference: infinite change


def test_teacache_accumulates_the_rescaled_change_and_resets():
    p = CachePolicy("teacache", 0.1, warmup=0, max_skips=9, poly=(2.0, 0.0))   # rescaled = 2 x change
    cache = run(p, [0.0, 0.03, 0.03, 0.03, 0.03, 0.03])
    # 0.06 skip, 0.12 full (reset), 0.06 skip, 0.12 full, 0.06 skip
    assert cache.decisions == [False, True, False, True, False, True]
    assert np.allclose(cache.signals[1:], [0.06, 0.12, 0.06, 0.12, 0.06])
    clamped = run(CachePolicy("teacache", 0.1, warmup=0, poly=(-1.0, 0.0)), [0.0, 0.5])
    assert clamped.signals[1] == 0.0 and clamped.decisions == [False, True]   # a fit below 0 counts as 0


@pytest.mark.parametrize("bad", [dict(mode="off"), dict(mode="magcache"), dict(threshold=-1.0),
                                 dict(threshold=float("nan")), dict(warmup=-1), dict(poly=())])
def test_bad_policies_are_refused(bad):
    with pytest.raises(VditError):
        CachePolicy(**{"mode": "fbcache", **bad})


def test_refs_follow_the_criteria():
    cache = CachePolicy("fbcache", 0.5, warmup=0).start(3)
    cache.update_refs(False, "r0", "m0", "R0")
    cache.update_refs(True, "r1", "m1")
    assert cache.refs == {"residual_ref": "r0", "modulated_ref": "m1", "tail_residual": "R0"}


def test_fit_poly_recovers_a_polynomial_and_the_file_round_trips(tmp_path):
    x = np.linspace(0.01, 0.2, 30)
    poly = fit_poly(x, 3 * x ** 2 + 0.5 * x, degree=2)
    assert np.allclose(poly, [3.0, 0.5, 0.0], atol=1e-8)
    with pytest.raises(VditError, match="at least 4"):
        fit_poly(x[:3], x[:3], degree=2)
    save_fit(tmp_path / "fit.json", poly, {"checkpoint_sha256": "a" * 64})
    assert np.allclose(load_fit(tmp_path / "fit.json", "a" * 64), poly)
    with pytest.raises(VditError, match="another|not this"):
        load_fit(tmp_path / "fit.json", "b" * 64)
    (tmp_path / "fit.json").write_text(json.dumps({"format": "vdit-cache-fit/1", "poly": ["x"], "checkpoint_sha256": ""}))
    with pytest.raises(VditError, match="poly"):
        load_fit(tmp_path / "fit.json")


def test_policy_is_torch_free():
    code = ("import sys; import vdit_deploy.step_cache, vdit_deploy.runtimes.ort_cache; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the split ------------------------------------------------------------------------------------------
def test_videodit_head_plus_tail_is_the_model(tiny_checkpoint):
    from vdit_deploy.cache_split import l1_stats, split
    from vdit_deploy.sources import load_source

    source = load_source(tiny_checkpoint)
    head, tail = split(source.module, 2, 1)
    x, t, y = torch.randn(3, *source.contract.latent), torch.tensor([5.0, 400, 990]), torch.tensor([0, 2, 4]).int()
    with torch.no_grad():
        full = source.module(x, t, y)
        zeros = [torch.zeros(1)] * 3
        h, c, residual, modulated, st, _ = head(x, t, y, *zeros)
        out, tail_residual = tail(h, c)
        skipped = head(x, t, y, *zeros[:2], tail_residual)[-1]
    assert torch.equal(out, full)                                              # the same ops in the same order
    assert float((skipped - full).abs().max()) < 1e-5                          # the cached residual stands in
    assert np.allclose(l1_stats(residual, residual * 0, modulated, modulated * 2).numpy(),
                       rel_l1_stats(residual, residual * 0, modulated, modulated * 2), rtol=1e-5)
    with pytest.raises(VditError, match="1..3"):
        split(source.module, 4, 1)


def test_latte_head_plus_tail_is_the_model(tmp_path):
    pytest.importorskip("diffusers")
    from conftest import save_tiny_latte
    from vdit_deploy.cache_split import split
    from vdit_deploy.sources import load_source

    source = load_source(save_tiny_latte(tmp_path / "latte", num_layers=3))
    head, tail = split(source.module, 1, 1)
    x, t, e = torch.randn(2, *source.contract.latent), torch.tensor([10.0, 700]), torch.randn(2, 5, 32)
    with torch.no_grad():
        full = source.module(x, t, e)
        h, *ctx, _, _, _, _ = head(x, t, e, *[torch.zeros(1)] * 3)
        out, _ = tail(h, *ctx)
    assert float((out - full).abs().max()) <= 1e-6 * float(full.abs().max())


def test_an_unknown_model_is_refused():
    from vdit_deploy.cache_split import adapter_for

    with pytest.raises(VditError, match="cannot split Linear"):
        adapter_for(torch.nn.Linear(2, 2))


# ---- the split graphs and cached sampling -----------------------------------------------------------------
def test_export_writes_the_split_graphs_with_their_record(cache_export):
    from vdit_deploy.export.metadata import check_export_dir

    metas = {p.name: m for p, m in check_export_dir(cache_export).items()}
    assert set(metas) == {"denoiser.onnx", "step.onnx", "denoiser-head.onnx", "denoiser-tail.onnx",
                          "step-head.onnx", "step-tail.onnx"}
    head = metas["step-head.onnx"]
    assert head.cache["blocks"] == 1 and head.cache["depth"] == 4 and head.cache["error"] <= 1e-5
    assert [o["name"] for o in head.io["outputs"]][-4:] == ["stats", "x_prev", "x0", "corr_next"]
    assert head.batch == {"min": 1, "max": 4} and metas["denoiser-head.onnx"].batch == {"min": 1, "max": 8}


def test_cache_split_is_refused_before_any_work(tiny_checkpoint, tmp_path):
    from vdit_deploy.export.onnx_export import export_checkpoint

    for options, match in ((dict(cache_split=4), "1..3"), (dict(cache_split=1, fixed=1), "fixed")):
        with pytest.raises(VditError, match=match):
            export_checkpoint(tiny_checkpoint, tmp_path / "out", **options)
        assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def flow_cache_export(tmp_path_factory):
    """The shipped flow-matching checkpoint (assets/tiny-flow, v output) with the split graphs."""
    from vdit_deploy.checkpoint import SHIPPED_FLOW
    from vdit_deploy.export.onnx_export import export_checkpoint

    return export_checkpoint(SHIPPED_FLOW, tmp_path_factory.mktemp("cache") / "flow", batch=(1, 4), cache_split=1)


@pytest.fixture(params=["ddpm", "flow"])
def cached_model(request):
    """(export, checkpoint, sampler): the tiny DDPM checkpoint with UniPC, the shipped flow checkpoint with
    its default sampler (flow euler)."""
    if request.param == "ddpm":
        return request.getfixturevalue("cache_export"), request.getfixturevalue("tiny_checkpoint"), "unipc"
    from vdit_deploy.checkpoint import SHIPPED_FLOW

    return request.getfixturevalue("flow_cache_export"), SHIPPED_FLOW, None


@pytest.mark.parametrize("cached_model,guidance", [("ddpm", 2.0), ("ddpm", 1.0), ("flow", 2.0)],
                         indirect=["cached_model"])
def test_ort_and_torch_take_the_same_decisions(cached_model, guidance):
    """The head graphs and the torch split give the policy the same stats: same skips, same videos."""
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import sample, sampler_plan

    export, checkpoint, sampler = cached_model
    with open_runtime("ort", export) as ort, open_runtime("torch", checkpoint, device="cpu") as tr:
        c = ort.contract
        plan = sampler_plan(c, sampler, 20)
        for mode in ("fbcache", "teacache"):
            probe = CachePolicy(mode, 0.0, warmup=1).start(len(plan))       # the signals, nothing skipped
            sample(ort, c, [0, 3], plan, guidance, 0, cache=probe)
            threshold = float(np.nanmedian(probe.signals))                  # some steps skip, some do not
            caches = [CachePolicy(mode, threshold, warmup=1).start(len(plan)) for _ in range(2)]
            videos = [sample(rt, c, [0, 3], plan, guidance, 0, cache=k) for rt, k in zip((ort, tr), caches)]
            assert caches[0].decisions == caches[1].decisions and 0 < sum(caches[0].decisions) < len(plan) - 2
            assert np.nanmax(np.abs(np.subtract(caches[0].signals, caches[1].signals))) < 1e-5
            assert np.abs(videos[0] - videos[1]).max() < 1e-3
        # nothing skipped (threshold 0): the cached sampler is the uncached one
        none = CachePolicy("fbcache", 0.0).start(len(plan))
        cached, plain = sample(ort, c, [1, 2], plan, guidance, 3, cache=none), sample(ort, c, [1, 2], plan, guidance, 3)
        assert none.full_steps == len(plan) and np.abs(cached - plain).max() < 1e-4


def test_cached_sampling_refusals(tiny_export, cache_export):
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import sample, sampler_plan

    with open_runtime("ort", tiny_export) as rt:
        plan = sampler_plan(rt.contract, "ddim", 5)
        with pytest.raises(VditError, match="--cache-split"):
            sample(rt, rt.contract, [0], plan, 2.0, cache=CachePolicy().start(5))
    with open_runtime("ort", cache_export) as rt:
        with pytest.raises(VditError, match="started for 4 steps"):
            sample(rt, rt.contract, [0], plan, 2.0, cache=CachePolicy().start(4))
        with pytest.raises(VditError, match="calibrate cache"):
            from vdit_deploy.step_cache import policy_for
            policy_for(rt, "teacache")


def test_calibrate_cache_fits_on_a_calibration_set(cache_export, tmp_path):
    from vdit_deploy.calibration.cache_fit import fit_cache
    from vdit_deploy.calibration.collect import collect
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.step_cache import policy_for

    sparse = collect(cache_export, tmp_path / "sparse", "unipc", 12, seeds=[0], labels=[0], timesteps=3)
    with pytest.raises(VditError, match="--timesteps equal to --steps"):
        fit_cache(cache_export, sparse)
    dense = collect(cache_export, tmp_path / "dense", "unipc", 12, seeds=[0], labels=[0, 1], timesteps=12)
    fit = fit_cache(cache_export, dense, degree=2)
    assert fit["points"] == 11 and len(fit["poly"]) == 3 and fit["rms_residual"] < 0.1
    with open_runtime("ort", cache_export) as rt:
        assert policy_for(rt, "teacache").poly == pytest.approx(fit["poly"])
    (cache_export / "cache_fit.json").unlink()


def test_trt_fake_takes_the_same_decisions(monkeypatch, cached_model, tmp_path):
    """Control flow against the strict TensorRT/cuda-python fakes (no numerics: the head engine's stats
    are scripted with what ONNX Runtime's head gave): the same skips, a head launch per step, a tail
    launch per full step, each engine eager once and then a CUDA graph replay, nothing leaked."""
    import shutil

    import trt_fake
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.runtimes.trt_build import find_engine
    from vdit_deploy.sampling import sample, sampler_plan

    source, _, sampler = cached_model
    export = shutil.copytree(source, tmp_path / "export", ignore=shutil.ignore_patterns("engines"))
    with open_runtime("ort", export) as ort:
        c = ort.contract
        plan = sampler_plan(c, sampler, 12)
        probe = CachePolicy("fbcache", 0.0, warmup=1).start(len(plan))
        sample(ort, c, [0, 3], plan, 2.0, 0, cache=probe)
        policy = CachePolicy("fbcache", float(np.nanmedian(probe.signals)), warmup=1)
        ort_cache = policy.start(len(plan))
        sample(ort, c, [0, 3], plan, 2.0, 0, cache=ort_cache)
    world = trt_fake.install(monkeypatch, "10.13.3.9", "12.9.10")
    world.kernel_writes["stats"] = [np.float32(s).tobytes() for s in ort_cache.stats]
    for kind in ("step", "denoiser", "step-head", "step-tail"):
        find_engine(export, kind, "fp32", build=True, progress=False, log=lambda m: None)
    with open_runtime("trt", export, precision="fp32") as rt:
        trt_cache = policy.start(len(plan))
        sample(rt, c, [0, 3], plan, 2.0, 0, cache=trt_cache)
        assert trt_cache.decisions == ort_cache.decisions and 0 < sum(trt_cache.decisions) < len(plan) - 2
        assert len(rt.files) == 3 and rt.files[0] not in rt.files[1:], rt.files   # step + head + tail engines
        kinds = [kind for kind, _ in world.launches]
        assert len(kinds) == len(plan) + trt_cache.full_steps            # a head per step, a tail per full step
        assert kinds.count("execute") == 2 and len(world.graph_execs) == 2    # each eager once, then its graph
    assert world.leaks() == {}, world.leaks()


def test_cli_sample_and_export_options(cache_export, tmp_path):
    from click.testing import CliRunner

    from vdit_deploy.cli import main

    runner = CliRunner()
    out = tmp_path / "v.npy"
    ok = runner.invoke(main, ["sample", "--runtime", "ort", "--onnx", str(cache_export), "--steps", "8", "--label",
                              "0,1", "--cache", "fbcache", "--cache-threshold", "0.5", "--cache-warmup", "1",
                              "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert "fbcache:" in ok.output and "of 8 steps in full" in ok.output and np.load(out).shape[0] == 2
    for args, match in ((["--cache", "teacache"], "calibrate cache"), (["--cache", "lru"], "'lru' is not one of"),
                        (["--cache", "fbcache", "--cache-threshold", "nan"], "not finite|finite")):
        bad = runner.invoke(main, ["sample", "--runtime", "ort", "--onnx", str(cache_export), "--steps", "4",
                                   *args, "--out", str(tmp_path / "w.npy")])
        assert bad.exit_code == 1 and len(bad.output.strip().splitlines()) <= 2, bad.output
        assert re.search(match, bad.output) and not (tmp_path / "w.npy").exists(), bad.output
    bad = runner.invoke(main, ["export", str(tmp_path), "--out", str(tmp_path / "e"), "--cache-split", "0"])
    assert bad.exit_code == 1 and "--cache-split" in bad.output


def test_wan_splits_exports_and_samples_cached_as_torch(tmp_path):
    """WanTransformer3DModel (2 tiny layers, pipeline layout): its RoPE has no batch axis, so the split
    recomputes it from the static latent in each graph instead of passing it head to tail; the export's
    check (head + tail = denoiser.onnx) passes and ORT takes torch's skips."""
    diffusers = pytest.importorskip("diffusers")
    from test_families import save_pipeline
    from vdit_deploy.export.onnx_export import export_source
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.runtimes.torch_runtime import TorchRuntime
    from vdit_deploy.sampling import sample, sampler_plan
    from vdit_deploy.sources import load_diffusers_source

    torch.manual_seed(0)
    net = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                          in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                          num_layers=2, rope_max_seq_len=32)
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0)
    path = save_pipeline(tmp_path, net, scheduler)
    source = load_diffusers_source(path, seq=(1, 8), latent=(4, 2, 8, 8))
    export = export_source(source, tmp_path / "export", batch=(1, 2), cache_split=1)
    cond = {"encoder_hidden_states": np.random.default_rng(0).standard_normal((2, 8, 16)).astype(np.float32)}
    with open_runtime("ort", export) as ort, TorchRuntime(None, source=source, device="cpu") as tr:
        c = ort.contract
        assert c.schedule.kind == "flow"
        plan = sampler_plan(c, None, 10)
        probe = CachePolicy("fbcache", 0.0, warmup=1).start(len(plan))
        sample(ort, c, cond, plan, 2.0, 0, cache=probe)
        policy = CachePolicy("fbcache", float(np.nanmedian(probe.signals)), warmup=1)
        caches = [policy.start(len(plan)) for _ in range(2)]
        videos = [sample(rt, c, cond, plan, 2.0, 0, cache=k) for rt, k in zip((ort, tr), caches)]
    assert caches[0].decisions == caches[1].decisions and 0 < sum(caches[0].decisions) < len(plan) - 2
    assert np.abs(videos[0] - videos[1]).max() < 1e-3
