"""What the CLI checks, the library checks too: the re-export guard in export_source, the memory
check in sampling.sample, and the null conditioning made once per shape by the runtimes (issue 18)."""
import numpy as np
import pytest

from vdit_deploy.contract import Contract, CondInput
from vdit_deploy.errors import VditError
from vdit_deploy.samplers import make_steps
from vdit_deploy.sampling import sample
from vdit_deploy.schedules import Schedule


def test_export_checkpoint_refuses_to_drop_variants_unless_keep_foreign(tiny_checkpoint, tmp_path):
    from vdit_deploy.export.onnx_export import export_checkpoint

    out = export_checkpoint(tiny_checkpoint, tmp_path / "e", batch=(1, 2), fixed=None)
    (out / "denoiser.fp16.onnx").write_bytes(b"a variant made from the old graphs")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(VditError, match="also holds denoiser.fp16.onnx"):
        export_checkpoint(tiny_checkpoint, out, batch=(1, 2))
    assert sorted(p.name for p in out.iterdir()) == before          # refused: nothing changed
    export_checkpoint(tiny_checkpoint, out, batch=(1, 2), keep_foreign=True)
    assert (out / "denoiser.fp16.onnx").read_bytes() == b"a variant made from the old graphs"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]   # no temporaries left


def test_sample_refuses_what_cannot_fit_before_allocating():
    huge = Contract(latent=(4, 1024, 1024, 1024), output="eps", schedule=Schedule(),
                    cond=(CondInput("y", "int32", ("batch",), 4),))
    calls = []
    with pytest.raises(VditError, match="sampling 2 videos needs about .* GiB"):
        sample(lambda x, t, c: calls.append(1), huge, [0, 1], make_steps(Schedule(), "ddim", 2))
    assert not calls


@pytest.mark.parametrize("runtime", ["ort", "torch"])
def test_null_conditioning_is_made_once_per_shape(runtime, tiny_latte, tiny_latte_export, monkeypatch):
    from vdit_deploy.runtimes import open_runtime
    from vdit_deploy.sampling import sampler_plan

    made = []
    real = Contract.null_batch
    monkeypatch.setattr(Contract, "null_batch", lambda self, null, cond: made.append(1) or real(self, null, cond))
    artifact = tiny_latte_export if runtime == "ort" else tiny_latte
    with open_runtime(runtime, artifact) as rt:
        rng = np.random.default_rng(0)
        seq = {"seq": rt.null["encoder_hidden_states"].shape[1]}     # the prompt as long as the null
        cond = rt.contract.example_cond(2, rng, seq)
        plan = sampler_plan(rt.contract, "unipc", 6)
        first = sample(rt, rt.contract, cond, plan, guidance=3.0, seed=1)
        assert len(made) == 1                      # not once per step
        again = sample(rt, rt.contract, cond, plan, guidance=3.0, seed=1)
        assert len(made) == 1 and np.array_equal(first, again)
        sample(rt, rt.contract, rt.contract.example_cond(1, rng, seq), plan, guidance=3.0, seed=1)
        assert len(made) == 2                      # another batch: made again
