"""Export: checker-clean ONNX with vdit metadata that matches PyTorch, and a verifier that catches drift."""
import collections
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from vdit_deploy.checkpoint import load_model
from vdit_deploy.cli import main
from vdit_deploy.errors import VditError
from vdit_deploy.export.metadata import read_metadata
from vdit_deploy.contract import NULL_FILE
from vdit_deploy.samplers import COEF_NAMES
from vdit_deploy.export.onnx_export import denoiser_inputs, export_denoiser, step_inputs
from vdit_deploy.export.verify import verify
from vdit_deploy.files import sha256_file


def ort_run(path, **feeds):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_export_is_checker_clean_with_metadata(tiny_export, tiny_checkpoint):
    for kind, batch in (("denoiser", {"min": 1, "max": 8}), ("step", {"min": 1, "max": 4})):
        path = tiny_export / f"{kind}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
        assert model.opset_import[0].version >= 17
        ops = collections.Counter(n.op_type for n in model.graph.node)
        assert not [op for op in ops if op.startswith("Sequence") or op in ("Loop", "If")], ops
        assert ops["Shape"] <= 12 and sum(ops.values()) < 600, ops    # dynamo keeps shape math small
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param      # dynamic batch
        meta = read_metadata(path)
        assert meta.kind == kind and meta.batch == batch and meta.precision == "fp32"
        assert meta.checkpoint_sha256 == sha256_file(tiny_checkpoint / "model.safetensors")
        assert meta.config == load_model(tiny_checkpoint)[1].model
        assert meta.contract.names == ("y",) and meta.contract.output == "eps" and meta.contract.label_input()
        names = {"denoiser": denoiser_inputs(meta.contract), "step": step_inputs(meta.contract)}[kind]
        assert [i.name for i in model.graph.input] == list(names)
        if kind == "step":
            assert "null_y" in names and [o.name for o in model.graph.output] == ["x_prev", "x0", "corr_next"]
            coefs = next(i for i in model.graph.input if i.name == "coefs")
            assert [d.dim_value for d in coefs.type.tensor_type.shape.dim] == [len(COEF_NAMES)] == [16]
        else:
            assert [o.name for o in model.graph.output] == ["out"]
        assert {"torch", "onnx", "exporter"} <= set(meta.versions)
        assert [i["name"] for i in meta.io["inputs"]] == [i.name for i in model.graph.input]


def test_ort_matches_torch_on_a_trajectory(tiny_export):
    report = verify(tiny_export, batches=(1, 3), num_steps=6, picks=3)
    assert report.ok, report.table()
    assert {(r.graph, r.output) for r in report.rows} == {("denoiser.onnx", "out"), ("step.onnx", "x_prev")}
    for row in report.rows:
        assert row.calls == 6 and row.rel_l2 < 1e-4 and row.max_abs > 0


def test_verify_fails_on_a_perturbed_export(tiny_export, tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    model = onnx.load(str(tiny_export / "denoiser.onnx"))
    weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))       # the largest matrix
    arr = onnx.numpy_helper.to_array(weight) * np.float32(1.02)
    weight.CopyFrom(onnx.numpy_helper.from_array(arr, weight.name))
    onnx.save(model, str(bad / "denoiser.onnx"))
    shutil.copy(tiny_export / NULL_FILE, bad)
    result = CliRunner().invoke(main, ["verify", str(bad), "--checkpoint", str(tiny_checkpoint)])
    assert result.exit_code == 1, result.output
    assert "Error: " in result.output and "denoiser.onnx out error" in result.output
    row = next(line for line in result.output.splitlines() if line.startswith("denoiser"))
    assert row.endswith("FAIL") and float(row.split()[4]) > 1e-4          # the rel L2 column
    assert "polygraphy: denoiser.onnx FAILED" in result.output or "not installed" in result.output


def test_verify_refuses_a_different_checkpoint(tiny_export, tiny_checkpoint, tmp_path):
    from vdit_deploy.checkpoint import SHIPPED, save_checkpoint

    with pytest.raises(VditError, match="config or schedule in its metadata differs"):
        verify(tiny_export, checkpoint=SHIPPED)
    model, info = load_model(tiny_checkpoint)             # same config and schedule, other weights
    state = {k: v + 0.01 for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "other", state, info.model, info.schedule, step=1, ema=False)
    with pytest.raises(VditError, match=r"is not the model .* was exported from \(sha256 differs\)"):
        verify(tiny_export, checkpoint=tmp_path / "other")


def test_verify_a_text_conditioned_learned_sigma_export(tiny_latte_export):
    """A diffusers Latte export (text embeddings, eps+var): verify replays its denoiser on the cond +
    null-embedding batch and its step graph on DDPM's learned-variance coefficients."""
    report = verify(tiny_latte_export, batches=(1, 2), num_steps=4, picks=2)
    assert report.ok, report.table()
    assert {(r.graph, r.output) for r in report.rows} == {("denoiser.onnx", "out"), ("step.onnx", "x_prev")}
    for row in report.rows:
        assert row.calls >= 4 and row.error < 1e-4 and row.max_abs > 0


def test_cli_fixed_batch_export_and_verify(tiny_checkpoint, tmp_path):
    out = tmp_path / "edge"
    result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "--out", str(out), "--fixed-batch", "1"])
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.output
    rows = {line.split()[0]: int(line.split()[2]) for line in result.output.splitlines() if line.endswith(" ok")}
    assert rows["denoiser.onnx"] > 0 and rows["step.onnx"] > 0     # the batch-1 denoiser is compared too
    for kind in ("denoiser", "step"):
        model = onnx.load(str(out / f"{kind}.onnx"), load_external_data=False)
        assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 8, 16, 16]
        assert read_metadata(out / f"{kind}.onnx").batch == {"fixed": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]        # no temp dirs left


def test_bad_batch_range_writes_nothing(tiny_checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "--out", str(tmp_path / "x"), "--batch", "4:2"])
    assert result.exit_code == 1 and "batch range" in result.output
    assert list(tmp_path.iterdir()) == []


def test_external_data_round_trip(tiny_checkpoint, tmp_path):
    """The > 2 GB path (weights in a .data file beside the graph), forced on the tiny model."""
    model, info = load_model(tiny_checkpoint)
    x, t, y = torch.randn(2, *info.model.video_shape), torch.tensor([3.0, 900.0]), torch.tensor([0, 4], dtype=torch.int32)
    path = export_denoiser(model, (x, t, y), tmp_path / "big.onnx", batch=(1, 4), external_data=True)
    assert (tmp_path / "big.onnx.data").stat().st_size > 1e6 > path.stat().st_size
    onnx.checker.check_model(str(path), full_check=True)
    got = ort_run(path, x_t=x.numpy()[:1], t=t.numpy()[:1], y=y.numpy()[:1])
    with torch.no_grad():
        ref = model(x[:1], t[:1], y[:1]).numpy()
    assert rel_l2(got, ref) < 1e-5


def test_export_denoiser_of_a_diffusers_video_transformer(tmp_path):
    """export_denoiser takes any (x_t, t, y) -> eps module: a tiny random Latte (diffusers) behind an adapter."""
    diffusers = pytest.importorskip("diffusers", reason="pip install 'vdit-deploy[dev]' for the diffusers test")

    class LabelAdapter(torch.nn.Module):
        """Class label -> a 2-token "caption" for Latte's cross-attention; eps = Latte's output."""
        def __init__(self, net, num_labels=5, tokens=2, width=16):
            super().__init__()
            self.net, self.tokens, self.width = net, tokens, width
            self.label = torch.nn.Embedding(num_labels, tokens * width)

        def forward(self, x_t, t, y):                      # (B, C, F, H, W), (B,), (B,) int32
            context = self.label(y).reshape(y.shape[0], self.tokens, self.width)
            return self.net(x_t, timestep=t, encoder_hidden_states=context, return_dict=False)[0]

    torch.manual_seed(0)
    latte = diffusers.LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
        cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=2, video_length=4,
        norm_type="ada_norm_single", activation_fn="gelu-approximate")
    net = LabelAdapter(latte).eval()
    example = (torch.randn(2, 4, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([0, 3], dtype=torch.int32))
    path = export_denoiser(net, example, tmp_path / "latte.onnx", batch=(1, 4))
    onnx.checker.check_model(str(path), full_check=True)
    x, t, y = torch.randn(3, 4, 4, 8, 8), torch.tensor([1.0, 250.0, 999.0]), torch.tensor([1, 2, 4], dtype=torch.int32)
    with torch.no_grad():
        ref = net(x, t, y).numpy()
    got = ort_run(path, x_t=x.numpy(), t=t.numpy(), y=y.numpy())
    assert np.abs(ref).mean() > 0 and rel_l2(got, ref) < 1e-4
