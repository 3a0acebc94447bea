"""The README's reliability promise, case by case: every user error is one `Error: ...` line and exit 1,
no traceback, and nothing is created or changed (outputs, pre-existing good files, hidden temporaries).

One shared workspace holds the artifacts the cases point at (a checkpoint, an export, a calibration set,
broken copies of each) and a good file; each case snapshots the whole workspace before and after."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from vdit_deploy.checkpoint import SHIPPED
from vdit_deploy.cli import main
from vdit_deploy.contract import NULL_FILE
from vdit_deploy.export.metadata import stamp

BAD_HEX = "ab" * 32


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


def edit_config(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint `src` whose config.json is edit(config) (a dict, or text to write as is)."""
    dst.mkdir(parents=True)
    os.link(src / "model.safetensors", dst / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    new = edit(cfg)
    (dst / "config.json").write_text(new if isinstance(new, str) else json.dumps(cfg if new is None else new))
    return dst


def edit_export(src: Path, dst: Path, changes: dict, resign: bool, files=("denoiser.onnx", "step.onnx")) -> Path:
    """A copy of export `src` with metadata props changed; resign: keep the digest consistent (a careful
    edit that only the schema or the cross-checks can catch)."""
    dst.mkdir(parents=True)
    for name in files:
        model = onnx.load(str(src / name))
        if resign:
            stamp(model, changes)
        else:
            for p in model.metadata_props:
                if p.key in changes:
                    p.value = changes[p.key]
        onnx.save(model, str(dst / name))
    if (src / NULL_FILE).is_file():
        shutil.copy(src / NULL_FILE, dst / NULL_FILE)
    return dst


def edited(path: Path, key: str, edit) -> dict:
    """{key: the JSON prop `key` of graph `path` after edit(dict)} (e.g. the contract's schedule)."""
    data = json.loads(_prop(path, key))
    edit(data)
    return {key: json.dumps(data, sort_keys=True)}


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_checkpoint, tiny_export):
    """The workspace: good and broken artifacts, and a good output file that must survive every case."""
    import torch
    from safetensors.torch import load_file, save_file

    from vdit_deploy.calibration.collect import collect

    root = tmp_path_factory.mktemp("ws")
    shutil.copytree(tiny_checkpoint, root / "ckpt")
    shutil.copytree(tiny_export, root / "export")
    (root / "good.gif").write_bytes(b"GIF89a a good file")
    (root / "a_dir.gif").mkdir()
    ck = root / "ckpt"
    edit_config(ck, root / "cfg_list", lambda c: "[1, 2, 3]")
    edit_config(ck, root / "cfg_true", lambda c: "true")
    edit_config(ck, root / "cfg_step", lambda c: {**c, "step": "abc"})
    edit_config(ck, root / "cfg_tubelet", lambda c: c["model"].update(tubelet=[2, 2]))
    edit_config(ck, root / "cfg_heads", lambda c: c["model"].update(num_heads=0))
    edit_config(ck, root / "cfg_mlp", lambda c: c["model"].update(mlp_ratio=-1))
    edit_config(ck, root / "cfg_depth", lambda c: c["model"].update(depth=100000))
    edit_config(ck, root / "cfg_width", lambda c: c["model"].update(hidden_size=1000000))
    edit_config(ck, root / "cfg_huge", lambda c: c["model"].update(hidden_size=65536, depth=4096, num_heads=64))
    edit_config(ck, root / "cfg_sched", lambda c: c["schedule"].update(num_timesteps="1000"))
    edit_config(ck, root / "cfg_trunc", lambda c: json.dumps(c)[:40])
    nan = root / "nan_weights"
    shutil.copytree(ck, nan)
    state = load_file(nan / "model.safetensors")
    state["final_layer.linear.weight"][0, 0] = torch.nan
    save_file(state, str(nan / "model.safetensors"))
    ex = root / "export"
    den = ex / "denoiser.onnx"
    # a careful edit: the model config and the contract agree, the digest is re-signed
    frames = {**edited(den, "vdit.model", lambda m: m["config"].update(frames=16)),
              **edited(den, "vdit.contract", lambda c: c["latent"].__setitem__(1, 16))}
    edit_export(ex, root / "meta_frames", frames, resign=True)
    classes = {**edited(den, "vdit.model", lambda m: m["config"].update(num_classes=9)),
               **edited(den, "vdit.contract", lambda c: c["cond"][0].update(classes=9))}
    edit_export(ex, root / "meta_classes", classes, resign=False)
    edit_export(ex, root / "meta_classes_signed", classes, resign=True)
    edit_export(ex, root / "meta_batch", {"vdit.batch": '"abc"'}, resign=True)
    cosine = edited(den, "vdit.contract", lambda c: c.update(schedule={"kind": "cosine", "num_timesteps": 1000}))
    edit_export(ex, root / "meta_sched", cosine, resign=False)
    edit_export(ex, root / "meta_sched_signed", cosine, resign=True)
    edit_export(ex, root / "meta_cond_signed", edited(den, "vdit.contract", lambda c: c["cond"][0].update(
        shape=["batch", "seq", 32])), resign=True)
    no_null = root / "no_null"
    shutil.copytree(ex, no_null)
    (no_null / NULL_FILE).unlink()
    other_null = root / "other_null"
    shutil.copytree(ex, other_null)
    save_null_file(other_null / NULL_FILE, {"y": np.array([0], np.int32)})    # a class label, not the null one
    mixed = edit_export(ex, root / "mixed", {"vdit.checkpoint_sha256": BAD_HEX}, resign=True, files=("step.onnx",))
    shutil.copy(ex / "denoiser.onnx", mixed / "denoiser.onnx")
    (root / "foreign").mkdir()
    (root / "foreign" / "model.onnx").write_bytes(b"not onnx")
    link = root / "linked"
    shutil.copytree(ex, link)
    (link / "denoiser.onnx.data").symlink_to(root / "good.gif")
    calib = collect(ex, root / "calib", steps=4, seeds=[0], timesteps=2)
    for name, edit in (("calib_trunc", lambda d: (d / "x_t.npy").write_bytes((calib / "x_t.npy").read_bytes()[:200])),
                       ("calib_object", lambda d: np.save(d / "y.npy", np.array([{"a": 1}] * 16, dtype=object),
                                                          allow_pickle=True)),
                       ("calib_foreign", lambda d: (d / "manifest.json").write_text(json.dumps(
                           {**json.loads((calib / "manifest.json").read_text()), "checkpoint_sha256": BAD_HEX})))):
        shutil.copytree(calib, root / name)
        edit(root / name)
    return root


def save_null_file(path: Path, arrays: dict) -> None:
    from safetensors.numpy import save_file
    save_file(arrays, str(path))


def _prop(path: Path, key: str) -> str:
    model = onnx.load(str(path), load_external_data=False)
    return next(p.value for p in model.metadata_props if p.key == key)


# (case id, args with {ws} for the workspace, what the one line must say)
CASES = [
    # 4: malformed config.json, metadata, options, paths, calibration files
    ("config-json-list", "sample --checkpoint {ws}/cfg_list --out {ws}/v.gif", "checkpoint config must be a JSON object"),
    ("config-json-true", "info {ws}/cfg_true", "checkpoint config must be a JSON object"),
    ("config-step-str", "sample --checkpoint {ws}/cfg_step --out {ws}/v.gif", "step must be an integer"),
    ("config-tubelet-2", "sample --checkpoint {ws}/cfg_tubelet --out {ws}/v.gif", "tubelet must be a list of 3"),
    ("config-heads-0", "sample --checkpoint {ws}/cfg_heads --out {ws}/v.gif", "num_heads must be between 1"),
    ("config-mlp-neg", "sample --checkpoint {ws}/cfg_mlp --out {ws}/v.gif", "mlp_ratio must be > 0"),
    ("config-schedule-str", "info {ws}/cfg_sched", "num_timesteps must be an integer"),
    ("config-truncated", "info {ws}/cfg_trunc", "is not valid JSON"),
    ("meta-frames-signed", "sample --runtime ort --onnx {ws}/meta_frames --out {ws}/v.gif", "the graph takes x_t of shape"),
    ("meta-classes-edited", "sample --runtime ort --onnx {ws}/meta_classes --out {ws}/v.gif", "metadata was edited"),
    ("meta-classes-signed", "sample --runtime ort --onnx {ws}/meta_classes_signed --label 7 --out {ws}/v.gif",
     "label table has 5 rows"),
    ("meta-batch-str", "sample --runtime ort --onnx {ws}/meta_batch --out {ws}/v.gif", "vdit.batch must be a JSON object"),
    ("label-huge", "sample --checkpoint {ws}/ckpt --label 99999999999999999999 --out {ws}/v.gif", "label 99999999999999999999 is out of range"),
    ("seed-negative", "sample --checkpoint {ws}/ckpt --seed -1 --out {ws}/v.gif", "Invalid value for '--seed'"),
    ("out-is-dir", "sample --checkpoint {ws}/ckpt --steps 2 --out {ws}/a_dir.gif", "is a directory"),
    ("out-in-proc", "sample --checkpoint {ws}/ckpt --steps 2 --out /proc/vdit-test/v.gif", "cannot write"),
    ("calib-truncated", "calibrate int8 {ws}/export --calib {ws}/calib_trunc", "not a readable .npy"),
    ("calib-object", "calibrate int8 {ws}/export --calib {ws}/calib_object", "not a readable .npy"),
    ("train-lr-nan", "train --lr nan --steps 1 --out {ws}/run", "finite number"),
    # 5: sizes refused before allocating
    ("config-depth-huge", "sample --checkpoint {ws}/cfg_depth --out {ws}/v.gif", "depth must be between 1 and 4096"),
    ("config-width-huge", "sample --checkpoint {ws}/cfg_width --out {ws}/v.gif", "hidden_size must be between"),
    ("config-memory", "sample --checkpoint {ws}/cfg_huge --out {ws}/v.gif", "GiB of memory, more than"),
    # 6: non-finite options, weights and outputs
    ("guidance-nan", "sample --checkpoint {ws}/ckpt --guidance nan --out {ws}/good.gif", "finite number"),
    ("guidance-inf", "sample --checkpoint {ws}/ckpt --guidance inf --out {ws}/good.gif", "finite number"),
    ("eta-nan", "sample --checkpoint {ws}/ckpt --eta nan --out {ws}/good.gif", "finite number"),
    ("weights-nan", "sample --checkpoint {ws}/nan_weights --steps 2 --out {ws}/good.gif", "holds NaN or inf"),
    ("collect-guidance-nan", "calibrate collect {ws}/export --guidance nan --out {ws}/c2", "finite number"),
    ("demo-guidance-nan", "demo --guidance nan --out {ws}/good.gif", "finite number"),
    # 7: inputs and outputs validated before any work or write
    ("fp16-calib-typo", "calibrate fp16 {ws}/export --calib {ws}/typo_dir", "is not a calibration set"),
    ("fp16-calib-foreign", "calibrate fp16 {ws}/export --calib {ws}/calib_foreign", "collect a new set"),
    ("int8-calib-foreign", "calibrate int8 {ws}/export --calib {ws}/calib_foreign --mode qdq", "collect a new set"),
    ("collect-out-export", "calibrate collect {ws}/export --out {ws}/ckpt", "refusing to replace"),
    ("export-out-proc", "export {ws}/ckpt --out /proc/vdit-test/x", "cannot write"),
    ("export-out-file", "export {ws}/ckpt --out {ws}/good.gif", "exists and is not a directory"),
    ("report-out-proc", "calibrate report {ws}/export --out /proc/vdit-test", "cannot write"),
    # 8: bounded planner
    ("plan-frames-huge", "plan --preset tiny --target orin-nano --frames 1000000000", "frames must be between"),
    # 3: graphs of one directory cross-checked, edited metadata refused
    ("meta-schedule-edited", "sample --runtime ort --onnx {ws}/meta_sched --out {ws}/v.gif", "metadata was edited"),
    ("meta-schedule-signed", "verify {ws}/meta_sched_signed --checkpoint {ws}/ckpt", "differs from"),
    ("meta-cond-signed", "sample --runtime ort --onnx {ws}/meta_cond_signed --out {ws}/v.gif",
     "cond 'y' shape must start with 'batch', then sizes or named axes with ranges"),
    ("null-missing", "sample --runtime ort --onnx {ws}/no_null --out {ws}/v.gif", "has no null_cond.safetensors"),
    ("null-other", "sample --runtime ort --onnx {ws}/other_null --out {ws}/v.gif",
     "is not the null conditioning these graphs were exported with"),
    ("cond-for-a-label-model", "sample --runtime ort --onnx {ws}/export --cond {ws}/good.gif --out {ws}/v.gif",
     "is not a readable safetensors file"),
    ("mixed-checkpoints", "sample --runtime ort --onnx {ws}/mixed --out {ws}/v.gif", "come from a different checkpoint"),
    # 2: verify that checks nothing fails
    ("verify-nothing", "verify {ws}/foreign --checkpoint {ws}/ckpt", "holds no vdit graph"),
    # 10: the smaller ones
    ("ddpm-steps", "sample --checkpoint {ws}/ckpt --sampler ddpm --steps 10 --out {ws}/v.gif", "ddpm runs all 1000 steps"),
    ("seed-abc", "sample --checkpoint {ws}/ckpt --seed abc --out {ws}/v.gif", "'abc' is not a valid integer"),
    ("unknown-command", "smaple", "No such command"),
    ("serve-link-out", "serve-export {ws}/linked --triton {ws}/triton", "outside"),
    ("export-fixed-batch-huge", "export {ws}/ckpt --out {ws}/x --fixed-batch 10000000", "GiB of memory, more than"),
    ("collect-too-many-rows", "calibrate collect {ws}/export --seeds 1000000 --out {ws}/c3", "GiB of memory"),
    ("calibrate-unknown", "calibrate bogus", "No such command"),
    ("collect-ddpm-steps", "calibrate collect {ws}/export --sampler ddpm --steps 2 --out {ws}/c4", "ddpm runs all"),
    ("int8-bad-regex", "calibrate int8 {ws}/export --keep-fp (", "not a valid regular expression"),
    ("sensitivity-bad-regex", "calibrate sensitivity {ws}/export --calib {ws}/calib --layers (",
     "not a valid regular expression"),
    ("reexport-variants", "export {ws}/ckpt --out {ws}/with_variant", "made from the graphs a new export replaces"),
]


@pytest.mark.parametrize("case, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_1_and_changes_nothing(ws, case, args, message):
    if case == "reexport-variants" and not (ws / "with_variant").exists():
        shutil.copytree(ws / "export", ws / "with_variant")
        shutil.copy(ws / "export" / "denoiser.onnx", ws / "with_variant" / "denoiser.fp16.onnx")
    before = snapshot(ws)
    result = run(*args.format(ws=ws).split())
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert message in lines[0] and "Traceback" not in result.output
    assert snapshot(ws) == before


def test_bare_command_prints_help_and_exits_0():
    result = run("calibrate")
    assert result.exit_code == 0 and result.output.startswith("Usage:")


def test_real_process_usage_error_is_one_line_exit_1(tmp_path):
    """Outside CliRunner too: the console script's exit code and stderr."""
    proc = subprocess.run([sys.executable, "-m", "vdit_deploy.cli", "sample", "--seed", "abc", "--out",
                           str(tmp_path / "v.gif")], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: ")


def test_planner_is_bounded():
    """A plan prints its table, then the refusal: huge batches and frame counts answer at once."""
    start = time.perf_counter()
    for args in (["--batch", 10 ** 9], ["--batch", 10 ** 18], ["--frames", 65536]):
        result = run("plan", "--preset", "XL", "--target", "orin-nano", *args)
        assert result.exit_code == 1 and result.output.splitlines()[-1].startswith("Error: ")
    result = run("plan", "--preset", "XL", "--target", "desktop-gpu", "--batch", 10 ** 6)
    assert "a smaller batch (--batch" in result.output
    assert time.perf_counter() - start < 10


# ---- item 1: the shipped checkpoint exports and verifies with the default options ---------------------
def test_shipped_checkpoint_exports_and_verifies_with_defaults(tmp_path):
    result = run("export", SHIPPED, "--out", tmp_path / "ship")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.endswith((" ok", "FAIL"))]
    assert {r.split()[0] for r in rows} == {"denoiser.onnx", "step.onnx"}
    assert all(r.endswith(" ok") for r in rows)
    step = next(r.split() for r in rows if r.startswith("step.onnx"))
    # the raw relative L2 is what the old global check failed on; the conditioned error is far below 1e-4
    assert float(step[5]) < 1e-5 and float(step[4]) > float(step[5])


def test_step_scale_bounds_float32_rounding_of_the_update():
    """float32 rounding alone (the same update on float64 inputs, then on float32 ones) moves x_prev by
    more than 1e-6 relative near t = T of the cosine schedule, where x0 = a x_t - b eps cancels; against
    the conditioning scale the same difference is at float32's 1e-7 level at every step."""
    from vdit_deploy.schedules import Schedule
    from vdit_deploy.samplers import apply_step, make_steps
    from vdit_deploy.export.verify import step_scale

    rng = np.random.default_rng(0)
    schedule = Schedule("cosine")
    plain, scaled = [], []
    for step in make_steps(schedule, "ddim", 10, eta=1.0):
        x0 = rng.uniform(-1, 1, (2, 3, 8, 16, 16))
        e = rng.standard_normal(x0.shape)
        x = schedule.q_sample(x0, step.t, e).astype(np.float32)           # a real x_t and a close eps
        eps = (e + 1e-2 * rng.standard_normal(x0.shape)).astype(np.float32)
        noise = rng.standard_normal(x0.shape, dtype=np.float32)
        ref = apply_step(x.astype(np.float64), eps.astype(np.float64), step.coefs, noise)
        diff = np.linalg.norm(apply_step(x, eps, step.coefs, noise) - ref)
        plain.append(diff / np.linalg.norm(ref))
        scaled.append(diff / np.linalg.norm(step_scale(x, eps, step.coefs, noise)))
    assert plain[0] > 1e-6 and max(scaled) < 1e-7


# ---- item 2: verify checks every graph, and a batch-1 export's denoiser too ----------------------------
def _add_bias(src: Path, dst: Path, bias: float = 0.5) -> None:
    from onnx import helper, numpy_helper
    model = onnx.load(str(src))
    out = model.graph.output[0]
    model.graph.node[-1].output[0] = out.name + "_raw"
    model.graph.initializer.append(numpy_helper.from_array(np.float32([bias]), "vdit_test_bias"))
    model.graph.node.append(helper.make_node("Add", [out.name + "_raw", "vdit_test_bias"], [out.name]))
    onnx.save(model, str(dst))


def test_verify_checks_a_fixed_batch_1_denoiser_and_each_variant(tiny_checkpoint, tmp_path):
    from vdit_deploy.calibration.fp16 import convert_fp16
    from vdit_deploy.errors import VditError
    from vdit_deploy.export.onnx_export import export_checkpoint
    from vdit_deploy.export.verify import check, verify

    quick = dict(batches=(1,), num_steps=4, picks=2, polygraphy=False)
    edge = export_checkpoint(tiny_checkpoint, tmp_path / "edge", fixed=1)
    convert_fp16(edge)
    report = check(verify(edge, **quick), edge)
    assert {r.graph for r in report.rows} == {"denoiser.onnx", "step.onnx", "denoiser.fp16.onnx", "step.fp16.onnx"}
    assert all(r.calls > 0 for r in report.rows)
    for name in ("denoiser.onnx", "denoiser.fp16.onnx"):      # +0.5 on eps: samples move by ~2
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(edge, bad)
        _add_bias(edge / name, bad / name)
        with pytest.raises(VditError, match=f"does not match PyTorch: {name} out"):
            check(verify(bad, **quick), bad)


def test_verify_lists_what_it_skipped(tiny_export, tmp_path):
    from vdit_deploy.export.verify import verify

    export = tmp_path / "e"
    shutil.copytree(tiny_export, export)
    (export / "notes.onnx").write_bytes(b"mine")
    report = verify(export, batches=(1,), num_steps=2, picks=1, polygraphy=False)
    assert report.ok and "skipped: notes.onnx: not a file name vdit gives a graph" in report.table()


# ---- item 9: temporaries of killed runs -------------------------------------------------------------
def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    from vdit_deploy.files import atomic_path

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.{dead}.abc123.tmp"
    (stale / "part").mkdir(parents=True)
    live = tmp_path / f".out.{os.getppid()}.def456.tmp"    # a live process's: left alone
    live.mkdir()
    with atomic_path(tmp_path / "out", is_dir=True) as tmp:
        (tmp / "x").write_text("1")
    assert not stale.exists() and live.exists() and (tmp_path / "out" / "x").is_file()


def test_sigterm_during_export_leaves_no_temporaries(tiny_checkpoint, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "vdit_deploy.cli", "export", str(tiny_checkpoint), "--out",
                             str(tmp_path / "onnx"), "--no-verify"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".onnx.*.tmp")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "export ended before a temporary appeared"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert list(tmp_path.iterdir()) == [], "a temporary or a partial export is left"


# ---- item 10 ---------------------------------------------------------------------------------------
def test_resume_with_fewer_steps_is_refused(tmp_path):
    assert run("train", "--steps", 2, "--batch-size", 2, "--out", tmp_path / "run").exit_code == 0
    before = snapshot(tmp_path)
    result = run("train", "--steps", 1, "--batch-size", 2, "--out", tmp_path / "run")
    assert result.exit_code == 1 and "already trained to step 2" in result.output
    assert snapshot(tmp_path) == before


# ==== issue 19: the trust boundary of model directories and exports ===================================
def _latte_copy(src: Path, dst: Path, config=None, drop=(), add=None) -> Path:
    """A copy of a tiny Latte directory (weights hard-linked unless changed): config edited by
    config(dict) (a dict, or text written as is), tensors dropped or added (a new safetensors file)."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.name != "config.json":
            os.link(p, dst / p.name)
    cfg = json.loads((src / "config.json").read_text())
    new = config(cfg) if config else None
    (dst / "config.json").write_text(new if isinstance(new, str) else json.dumps(cfg if new is None else new))
    if drop or add:
        weights = dst / "diffusion_pytorch_model.safetensors"
        state = load_file(weights)
        weights.unlink()
        for key in drop:
            state.pop(key)
        save_file({**state, **(add or {})}, str(weights))
    return dst


def _header_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    import struct
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _external_initializer(src: Path, dst: Path, location: str) -> None:
    """Graph `src` saved at `dst` with its largest initializer's bytes "outside", at `location`."""
    from onnx import TensorProto
    model = onnx.load(str(src))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    size = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        tensor.external_data.add(key=key, value=value)
    onnx.save(model, str(dst))


@pytest.fixture(scope="module")
def dws(tmp_path_factory, tiny_latte, tiny_export, tiny_checkpoint):
    """The diffusers workspace: a tiny Latte directory and broken copies of it, exports with forged
    external data or half a variant, and a good file that must survive every case."""
    from safetensors.numpy import load_file, save_file

    root = tmp_path_factory.mktemp("dws")
    la = shutil.copytree(tiny_latte, root / "latte")
    (root / "good.gif").write_bytes(b"GIF89a a good file")
    weights = la / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    key = sorted(state)[0]
    edits = {"layers_neg": lambda c: c.update(num_layers=-1), "layers_3": lambda c: c.update(num_layers=3),
             "layers_huge": lambda c: c.update(num_layers=1000000), "side_huge": lambda c: c.update(sample_size=20000),
             "frames_float": lambda c: c.update(video_length=1e6), "frames_huge": lambda c: c.update(video_length=10 ** 6),
             "side_nan": lambda c: c.update(sample_size=float("nan")), "caption_str": lambda c: c.update(
                 caption_channels="abc"), "caption_missing": lambda c: {k: x for k, x in c.items() if k != "caption_channels"},
             "cfg_text": lambda c: "not json", "cfg_list": lambda c: "[1, 2]", "cfg_empty": lambda c: "{}",
             "cfg_deep": lambda c: "[" * 100000 + "]" * 100000, "class_other": lambda c: c.update(_class_name="this"),
             "class_pipeline": lambda c: c.update(_class_name="LattePipeline")}
    for name, edit in edits.items():
        _latte_copy(la, root / name, edit)
    _latte_copy(la, root / "missing_weight", drop=[key])
    _latte_copy(la, root / "unexpected_weight", config=lambda c: c.update(unused_option=1),
                add={f"extra.{i}.weight": np.zeros(2, np.float32) for i in range(300)})
    # 1: a decoy shard and an index that maps every key to real.safetensors
    decoy = _latte_copy(la, root / "decoy")
    os.replace(decoy / "diffusion_pytorch_model.safetensors", decoy / "real.safetensors")
    save_file({"a": np.zeros(4, np.float32)}, str(decoy / "diffusion_pytorch_model-00001-of-00001.safetensors"))
    (decoy / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "real.safetensors" for k in state}}))
    for name, target in (("index_outside", "../latte/diffusion_pytorch_model.safetensors"),
                         ("index_lacking", "diffusion_pytorch_model-00001-of-00001.safetensors")):
        d = _latte_copy(la, root / name)
        (d / "diffusion_pytorch_model.safetensors").unlink()
        save_file({"a": np.zeros(4, np.float32)}, str(d / "diffusion_pytorch_model-00001-of-00001.safetensors"))
        (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            k: target for k in state}}))
    d = _latte_copy(la, root / "shards_no_index")
    os.replace(d / "diffusion_pytorch_model.safetensors", d / "diffusion_pytorch_model-00001-of-00002.safetensors")
    d = _latte_copy(la, root / "both_layouts")
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: "diffusion_pytorch_model.safetensors" for k in state}}))
    d = _latte_copy(la, root / "shard_link_out")
    os.replace(d / "diffusion_pytorch_model.safetensors", root / "outside.safetensors")
    (d / "diffusion_pytorch_model.safetensors").symlink_to(root / "outside.safetensors")
    # 8/9: special files and broken headers
    for name, target in (("cfg_zero", "config.json"), ("weights_zero", "diffusion_pytorch_model.safetensors")):
        d = _latte_copy(la, root / name)
        (d / target).unlink()
        (d / target).symlink_to("/dev/zero")
    d = _latte_copy(la, root / "cfg_fifo")
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")
    for name, make in (("st_5_bytes", lambda p: p.write_bytes(b"\x01\x02\x03\x04\x05")),
                       ("st_not_json", lambda p: _header_file(p, b"{not json", b"\0" * 16)),
                       ("st_forged", lambda p: _header_file(p, json.dumps({"w": {
                           "dtype": "F32", "shape": [10 ** 9, 10 ** 9], "data_offsets": [0, 16]}}).encode(),
                           b"\0" * 16))):
        d = _latte_copy(la, root / name)
        (d / "diffusion_pytorch_model.safetensors").unlink()
        make(d / "diffusion_pytorch_model.safetensors")
    d = _latte_copy(la, root / "sched_bad")
    (d / "scheduler_config.json").unlink()     # hard-linked to the others'
    (d / "scheduler_config.json").write_text(json.dumps({**json.loads((la / "scheduler_config.json").read_text()),
                                                         "num_train_timesteps": -5}))
    # 3: graphs whose external data points outside the export
    for name, location in (("ext_passwd", "../../../../etc/passwd"), ("ext_other", "weights.bin")):
        d = shutil.copytree(tiny_export, root / name)
        _external_initializer(tiny_export / "denoiser.onnx", d / "denoiser.onnx", location)
    # 7: half an fp16 variant
    half = shutil.copytree(tiny_export, root / "half_fp16")
    model = onnx.load(str(tiny_export / "denoiser.onnx"))
    stamp(model, {"vdit.precision": "fp16"})
    onnx.save(model, str(half / "denoiser.fp16.onnx"))
    # 2: an export whose metadata names a module to import (re-stamped: the checksum has no key)
    foreign = shutil.copytree(tiny_export, root / "meta_this")
    for name in ("denoiser.onnx", "step.onnx"):
        model = onnx.load(str(foreign / name))
        stamp(model, {"vdit.model": json.dumps({"class": "this:x", "config": {}})})
        onnx.save(model, str(foreign / name))
    save_null_file(root / "cond_rows.safetensors", {"y": np.zeros(10 ** 6, np.int32)})
    ck = root / "ckpt_zero"
    ck.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", ck / "config.json")
    (ck / "model.safetensors").symlink_to("/dev/zero")
    # a schedule changed to cosine and re-stamped: verify compares it with the scheduler config beside the model
    sched = shutil.copytree(tiny_export, root / "meta_cosine")
    for name in ("denoiser.onnx", "step.onnx"):
        model = onnx.load(str(sched / name))
        stamp(model, {"vdit.model": json.dumps({"class": "diffusers:LatteTransformer3DModel", "config": {}}),
                      **edited(sched / name, "vdit.contract", lambda c: c.update(
                          schedule={"kind": "cosine", "num_timesteps": 1000}))})
        onnx.save(model, str(sched / name))
    save_null_file(root / "cond_many.safetensors", {f"t{i}": np.zeros(1, np.float32) for i in range(100000)})
    return root


D_CASES = [
    # 1: the files the index names, inside the directory
    ("index-outside", "info {ws}/index_outside", "a shard must be a .safetensors file name in this directory"),
    ("index-lacking-keys", "export {ws}/index_lacking --out {ws}/x --no-verify", "maps"),
    ("shards-no-index", "info {ws}/shards_no_index", "but no diffusion_pytorch_model.safetensors.index.json"),
    ("both-layouts", "export {ws}/both_layouts --out {ws}/x", "ambiguous"),
    ("shard-link-out", "export {ws}/shard_link_out --out {ws}/x --no-verify", "outside"),
    # 2: no module named by a file is imported
    ("config-class-not-diffusers", "export {ws}/class_other --out {ws}/x", "is not a diffusers model class name"),
    ("config-class-pipeline", "export {ws}/class_pipeline --out {ws}/x", "is not a diffusers model"),
    ("meta-class-this", "verify {ws}/meta_this --checkpoint {ws}/latte", "not one of diffusers' own classes"),
    ("meta-class-other-typed", "verify {ws}/meta_this --checkpoint {ws}/latte --class own_models:MaskedTextDiT",
     "was exported from this:x, not --class own_models:MaskedTextDiT"),
    ("meta-schedule-cosine", "verify {ws}/meta_cosine --checkpoint {ws}/latte", "the schedule in its metadata differs"),
    # 3: external data outside the export, in every command that loads or copies a graph
    ("ext-serve", "serve-export {ws}/ext_passwd --triton {ws}/triton", "keeps its data in '../../../../etc/passwd'"),
    ("ext-sample", "sample --runtime ort --onnx {ws}/ext_passwd --out {ws}/v.gif", "keeps its data in"),
    ("ext-fp16", "calibrate fp16 {ws}/ext_passwd", "keeps its data in"),
    ("ext-int8", "calibrate int8 {ws}/ext_passwd", "keeps its data in"),
    ("ext-info", "info {ws}/ext_passwd", "keeps its data in"),
    ("ext-other-file", "sample --runtime ort --onnx {ws}/ext_other --out {ws}/v.gif", "keeps its data in 'weights.bin'"),
    # 4: missing or unexpected weights
    ("layers-negative", "export {ws}/layers_neg --out {ws}/x", "num_layers must be between 0"),
    ("layers-more-than-weights", "export {ws}/layers_3 --out {ws}/x", "num_layers = 3, but the weights hold"),
    ("weight-missing", "export {ws}/missing_weight --out {ws}/x", "1 missing"),
    ("weight-unexpected", "export {ws}/unexpected_weight --out {ws}/x", "300 unexpected"),
    # 5: options that do not apply
    ("latte-input", "export {ws}/latte --out {ws}/x --input encoder_hidden_states:float32:seq,32", "drop --input"),
    ("seq-without-named-axes", "export {ws}/latte --out {ws}/x --class own_models:MaskedTextDiT --latent 4,2,8,8 "
     "--input context:float32:8,8 --input mask:float32:8 --seq 1:5", "no --input has one"),
    # 6: float options bounded
    ("guidance-1e308", "sample --runtime ort --onnx {ws}/half_fp16 --guidance 1e308 --out {ws}/good.gif",
     "Invalid value for '--guidance'"),
    ("tolerance-1e39", "verify {ws}/half_fp16 --tolerance 1e39", "Invalid value for '--tolerance'"),
    # 7: half a variant is refused, not run with the host-side step
    ("half-fp16", "sample --runtime ort --onnx {ws}/half_fp16 --precision fp16 --out {ws}/v.gif",
     "without step.fp16.onnx"),
    # 8: sizes before allocation
    ("export-batch-1e11", "export {ws}/latte --out {ws}/x --batch 1:100000000000", "MAX <= 2147483647"),
    ("export-fixed-batch-1e6", "export {ws}/latte --out {ws}/x --fixed-batch 1000000", "GiB of memory"),
    ("export-seq-5e7", "export {ws}/latte --out {ws}/x --seq 1:50000000", "give a smaller --seq"),
    ("layers-1e6", "export {ws}/layers_huge --out {ws}/x", "num_layers = 1000000"),
    ("side-20000", "export {ws}/side_huge --out {ws}/x", "GiB of memory"),
    ("frames-1e6-float", "export {ws}/frames_float --out {ws}/x", "video_length must be an integer"),
    ("frames-1e6", "export {ws}/frames_huge --out {ws}/x", "GiB of memory"),
    ("compare-batch-1e9", "compare {ws}/half_fp16 --runtimes ort:fp32 --batch 1000000000 --out {ws}/c", "GiB of memory"),
    ("compare-batch-1e5", "compare {ws}/half_fp16 --runtimes ort:fp32 --batch 100000 --steps 2 --out {ws}/c",
     "GiB of memory"),
    ("compare-seeds-1e8", "compare {ws}/half_fp16 --runtimes ort:fp32 --seeds 0-100000000 --out {ws}/c",
     "at most 10000 values"),
    ("config-dev-zero", "info {ws}/cfg_zero", "is not a regular file"),
    ("checkpoint-weights-dev-zero", "verify {ws}/half_fp16 --checkpoint {ws}/ckpt_zero", "is not a regular file"),
    ("checkpoint-weights-dev-zero-sample", "sample --checkpoint {ws}/ckpt_zero --out {ws}/v.gif", "is not a regular file"),
    ("cond-1e6-rows-sample", "sample --runtime ort --onnx {ws}/half_fp16 --cond {ws}/cond_rows.safetensors "
     "--out {ws}/v.npy", "1,000,000 conditioning rows"),
    ("cond-1e6-rows-compare", "compare {ws}/half_fp16 --runtimes ort:fp32 --cond {ws}/cond_rows.safetensors "
     "--out {ws}/c", "1,000,000 conditioning rows"),
    ("config-fifo", "export {ws}/cfg_fifo --out {ws}/x", "is not a regular file"),
    ("weights-dev-zero", "info {ws}/weights_zero", "is not a regular file"),
    # 9: tracebacks before
    ("side-nan", "export {ws}/side_nan --out {ws}/x", "sample_size must be an integer"),
    ("caption-missing", "info {ws}/caption_missing", "lacks caption_channels"),
    ("caption-str", "export {ws}/caption_str --out {ws}/x", "caption_channels must be an integer"),
    ("safetensors-5-bytes", "info {ws}/st_5_bytes", "is 5 bytes"),
    ("safetensors-not-json", "info {ws}/st_not_json", "header is not valid JSON"),
    ("input-dim-negative", "export {ws}/latte --out {ws}/x --class own_models:MaskedTextDiT --latent 4,2,8,8 "
     "--input context:float32:-1 --input mask:float32:seq", "each dimension is a size"),
    # 11: unclear before
    ("config-not-json", "info {ws}/cfg_text", "is not valid JSON"),
    ("config-list", "export {ws}/cfg_list --out {ws}/x", "is not a diffusers model config"),
    ("config-empty", "info {ws}/cfg_empty", "is not a diffusers model config"),
    ("config-deep", "info {ws}/cfg_deep", "is not valid JSON"),
    ("safetensors-forged", "info {ws}/st_forged", "forged or corrupt header"),
    ("cond-100k-tensors", "sample --runtime ort --onnx {ws}/half_fp16 --cond {ws}/cond_many.safetensors "
     "--out {ws}/v.gif", "and 99996 more"),
    ("scheduler-config-named", "export {ws}/sched_bad --out {ws}/x", "sched_bad/scheduler_config.json"),
    ("input-duplicate", "export {ws}/latte --out {ws}/x --class own_models:MaskedTextDiT --latent 4,2,8,8 "
     "--input context:float32:seq,8 --input context:float32:seq", "must be unique"),
    ("opset-99", "export {ws}/latte --out {ws}/x --opset 99", "Invalid value for '--opset'"),
]


@pytest.mark.parametrize("case, args, message", D_CASES, ids=[c[0] for c in D_CASES])
def test_untrusted_model_directories_and_exports(dws, case, args, message):
    """Issue 19's cases: exit 1, one Error: line naming the cause, no traceback, nothing changed, at once."""
    import resource

    before = snapshot(dws)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = run(*args.format(ws=dws).split())
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and len(lines[0]) < 400, result.output[:2000]
    assert message in lines[0] and "Traceback" not in result.output
    assert snapshot(dws) == before
    assert time.perf_counter() - start < 60
    # peak RSS of this process grows by far less than 1 GB (ru_maxrss is in KiB)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 2 ** 20
    assert "this" not in sys.modules or case != "meta-class-this"    # the Zen of Python never printed


def test_decoy_shard_the_hash_size_and_loader_read_the_same_files(dws):
    """The index names real.safetensors: info counts its parameters (not the decoy's 4), the hash covers
    it (a changed real.safetensors changes the hash), and the loader loads it."""
    from vdit_deploy.files import sha256_files
    from vdit_deploy.sources import load_source, model_files

    decoy, latte = dws / "decoy", dws / "latte"
    files = model_files(decoy)
    assert [f.name for f in files] == ["config.json", "diffusion_pytorch_model.safetensors.index.json",
                                       "real.safetensors"]
    result = run("info", decoy)
    params = run("info", latte).output.split("file(s), ")[1].split(" parameters")[0]
    assert result.exit_code == 0 and f"1 safetensors file(s), {params} parameters" in result.output
    source = load_source(decoy)
    assert source.files == files and sha256_files(files) == source.sha256
    expected = load_source(latte).module.state_dict()
    assert all(np.array_equal(v.numpy(), expected[k].numpy()) for k, v in source.module.state_dict().items())


def test_model_class_comes_from_diffusers_or_the_command_line():
    from vdit_deploy.diffusers_models import model_class
    from vdit_deploy.errors import VditError

    import diffusers
    assert model_class("diffusers:LatteTransformer3DModel") is diffusers.LatteTransformer3DModel
    for name, message in (("this:x", "imported only from a --class"), ("os:path", "imported only from a --class"),
                          ("diffusers:__loader__", "not a diffusers model class name"),
                          ("diffusers:DDPMScheduler", "is not a diffusers model")):
        with pytest.raises(VditError, match=message):
            model_class(name)
    assert "this" not in sys.modules
    assert model_class("own_models:MaskedTextDiT", typed=True).__name__ == "MaskedTextDiT"


def test_unexpected_weights_are_one_line_on_a_real_stderr(dws):
    """diffusers logs through its own stderr handler (which CliRunner does not capture): silenced."""
    proc = subprocess.run([sys.executable, "-m", "vdit_deploy.cli", "export", str(dws / "unexpected_weight"), "--out",
                           str(dws.parent / "never"), "--no-verify"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: ") and "300 unexpected" in proc.stderr


def test_a_failed_trace_gives_the_first_line_of_its_cause(tmp_path):
    import torch

    from vdit_deploy.errors import VditError
    from vdit_deploy.export.onnx_export import export_denoiser

    class Broken(torch.nn.Module):
        def forward(self, x_t, t, y):
            raise ValueError("the real cause\nand more lines")

    with pytest.raises(VditError) as e:
        export_denoiser(Broken(), (torch.zeros(2, 1, 1, 2, 2), torch.zeros(2), torch.zeros(2, dtype=torch.int32)),
                        tmp_path / "b.onnx", batch=(1, 4))
    assert "ValueError: the real cause" in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_check_cond_messages_name_only_what_applies():
    from vdit_deploy.contract import BATCH, CondInput, Contract
    from vdit_deploy.errors import VditError

    c = Contract((1, 1, 2, 2), "eps", (CondInput("emb", "float32", (BATCH, "seq")),))
    with pytest.raises(VditError) as e:
        c.check_cond({"emb": np.zeros((1, 3), np.float32), "extra": np.zeros(1)})
    assert "has unknown extra" in str(e.value) and "lacks" not in str(e.value)
    with pytest.raises(VditError) as e:
        c.check_cond({})
    assert "lacks emb" in str(e.value) and "unknown" not in str(e.value)
    with pytest.raises(VditError) as e:
        c.check_cond({"emb": np.zeros((1, 0), np.float32)})
    assert "below 1" in str(e.value) and "None" not in str(e.value)


def test_a_variant_is_written_whole_or_not_at_all(tiny_export, tmp_path, monkeypatch):
    """A full disk while the step graph is saved: neither fp16 graph appears."""
    from vdit_deploy.calibration.fp16 import convert_fp16

    export = shutil.copytree(tiny_export, tmp_path / "e")
    before = snapshot(export)
    real_save = onnx.save

    def save(model, path, *a, **k):
        if "step" in Path(path).name:
            raise OSError(28, "No space left on device", str(path))
        return real_save(model, path, *a, **k)
    monkeypatch.setattr(onnx, "save", save)
    with pytest.raises(OSError):
        convert_fp16(export)
    assert snapshot(export) == before and not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def test_dead_processes_temporaries_do_not_block_an_export(tiny_export, tmp_path):
    """A SIGKILLed `calibrate fp16` leaves .denoiser.fp16.onnx.PID.*.tmp.onnx: the next export into that
    directory removes it (its process is gone) instead of asking the user to."""
    from vdit_deploy.export.metadata import export_own_files

    export = shutil.copytree(tiny_export, tmp_path / "e")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = export / f".denoiser.fp16.onnx.{dead}.k2j3_x.tmp.onnx"
    stale.write_bytes(b"partial")
    export_own_files(export)
    assert not stale.exists()


def test_a_full_disk_is_said_and_names_the_file(tmp_path):
    """/dev/full: every write fails with ENOSPC, as a full disk during `calibrate collect` does."""
    from vdit_deploy.errors import VditError
    from vdit_deploy.files import save_npy

    with pytest.raises(VditError) as e:
        save_npy(Path("/dev/full"), np.zeros(196608, np.float32), tmp_path / "calib")
    assert "cannot write full of" in str(e.value) and "786,432 bytes" in str(e.value)
    assert "No space left on device" in str(e.value) or "disk full" in str(e.value)
