"""Seeded fuzzing of the three kinds of JSON users hand-edit: checkpoint config.json, export metadata and
calibration manifests. Each mutated document is either accepted or refused with one VditError line;
any other exception (KeyError, TypeError, ZeroDivisionError, OverflowError...) is a bug."""
import copy
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from vdit_deploy.checkpoint import parse_config
from vdit_deploy.cli import main
from vdit_deploy.errors import VditError
from vdit_deploy.export.metadata import DIGESTED, ExportMetadata, digest

CASES = 300
ODD_VALUES = [None, True, False, 0, -1, 1, 2, 3, 7, 2 ** 31, 10 ** 30, -10 ** 30, 0.5, -0.5, 1e308, float("nan"),
              float("inf"), "", "abc", "1", [], {}, [1, 2], [2, 2, 2], [0, 0, 0], {"a": 1}, "x" * 1000]


def mutate(rng: np.random.Generator, doc):
    """One random edit somewhere in a JSON tree: a value replaced by an odd one, a key deleted or added,
    a container emptied, or a number scaled."""
    doc = copy.deepcopy(doc)
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + [i])

    walk(doc, [])
    path = paths[rng.integers(len(paths))]
    if not path:
        return ODD_VALUES[rng.integers(len(ODD_VALUES))]
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key, op = path[-1], rng.integers(5)
    if op == 0:
        parent[key] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
    elif op == 1 and isinstance(parent, dict):
        del parent[key]
    elif op == 2 and isinstance(parent, dict):
        parent["unexpected_" + str(rng.integers(100))] = 1
    elif op == 3 and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = parent[key] * [-1, 0, 2, 1000, 10 ** 9][rng.integers(5)]
    else:
        parent[key] = type(parent[key])() if isinstance(parent[key], (dict, list, str)) else None
    return doc


def mutations(seed: int, doc, n: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        out = doc
        for _ in range(rng.integers(1, 4)):
            out = mutate(rng, out)
        yield out


def assert_one_line_or_ok(fn, *args):
    try:
        fn(*args)
    except VditError as e:
        assert "\n" not in str(e) and str(e), repr(e)


def test_fuzz_checkpoint_config(tiny_checkpoint, tmp_path):
    good = json.loads((tiny_checkpoint / "config.json").read_text())
    for doc in mutations(0, good, CASES):
        assert_one_line_or_ok(parse_config, doc, tiny_checkpoint, "config.json")


def test_fuzz_checkpoint_config_through_the_cli(tiny_checkpoint, tmp_path):
    """A few mutated files through `vdit info`, as a user meets them: exit 0, or 1 with one line."""
    good = json.loads((tiny_checkpoint / "config.json").read_text())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    os.link(tiny_checkpoint / "model.safetensors", ckpt / "model.safetensors")
    rng = np.random.default_rng(1)
    for i, doc in enumerate(mutations(1, good, 40)):
        text = json.dumps(doc)
        if i % 4 == 0:   # and raw text damage: truncation
            text = text[:rng.integers(len(text))]
        (ckpt / "config.json").write_text(text)
        result = CliRunner().invoke(main, ["info", str(ckpt)])
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        if result.exit_code:
            assert result.exit_code == 1 and result.output.count("\n") == 1 and result.output.startswith("Error: ")


@pytest.mark.parametrize("resign", [False, True], ids=["edited", "edited-and-re-signed"])
def test_fuzz_export_metadata(tiny_export, resign):
    import onnx

    model = onnx.load(str(tiny_export / "denoiser.onnx"), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    # the props are strings holding JSON: fuzz the decoded tree, then encode the strings again
    tree = {k: json.loads(v) if k not in ("vdit.kind", "vdit.precision", "vdit.checkpoint_sha256", "vdit.digest",
                                          "vdit.checkpoint") else v for k, v in props.items()}
    for doc in mutations(2 + resign, tree, CASES):
        if not isinstance(doc, dict):
            doc = {"vdit.kind": doc}
        edited = {k: v if isinstance(v, str) else json.dumps(v) for k, v in doc.items()}
        if resign and all(k in edited for k in DIGESTED):
            edited["vdit.digest"] = digest(edited)
        assert_one_line_or_ok(ExportMetadata.from_props, edited, "denoiser.onnx")


def test_fuzz_calibration_manifest(tiny_export, tmp_path):
    from vdit_deploy.calibration.collect import collect, load_calibration_set
    from vdit_deploy.export.metadata import read_metadata

    good_dir = collect(tiny_export, tmp_path / "calib", steps=3, seeds=[0], timesteps=2)
    meta = read_metadata(tiny_export / "denoiser.onnx")
    good = json.loads((good_dir / "manifest.json").read_text())
    for i, doc in enumerate(mutations(4, good, CASES)):
        case = tmp_path / f"c{i}"
        case.mkdir()
        for name in ("x_t.npy", "t.npy", "y.npy"):
            os.link(good_dir / name, case / name)
        (case / "manifest.json").write_text(json.dumps(doc))

        def load_and_batch():
            cset = load_calibration_set(case, meta.checkpoint_sha256, meta.contract)
            list(cset.batches(1, 4))                    # what int8 calibration then reads from it
            list(cset.step_batches(1, 4))
        assert_one_line_or_ok(load_and_batch)
        shutil.rmtree(case)


def test_fuzz_conditioning_against_the_contract():
    """Conditioning as a --cond file or an API caller hands it in: names, ranks, sizes, dtypes and values
    mutated at random against a text + mask contract and a class-label one. check_cond (and the null
    pairing after it) accepts or refuses in one line; what it accepts has the contract's dtypes and shapes."""
    from vdit_deploy.contract import BATCH, CondInput, Contract

    text = Contract((4, 2, 8, 8), "eps+var", (CondInput("emb", "float32", (BATCH, "seq", 8)),
                                              CondInput("mask", "bool", (BATCH, "seq"))), axes={"seq": (1, 16)})
    label = Contract((3, 8, 16, 16), "eps", (CondInput("y", "int32", (BATCH,), classes=4),))
    rng = np.random.default_rng(5)
    dtypes = [np.float32, np.float16, np.float64, np.int32, np.int64, bool, np.uint8, object]
    for contract in (text, label):
        null = contract.example_cond(1, rng)
        for _ in range(CASES):
            cond = contract.example_cond(int(rng.integers(1, 4)), rng, {"seq": int(rng.integers(1, 17))})
            for _ in range(rng.integers(1, 3)):
                name = list(cond)[rng.integers(len(cond))] if cond else "x"
                op = rng.integers(6)
                a = cond.get(name, np.zeros(2))
                if op == 0:
                    cond.pop(name, None)
                elif op == 1:
                    cond["unknown_" + str(rng.integers(3))] = a
                elif op == 2:
                    cond[name] = a.reshape(-1) if a.ndim > 1 else a[..., None]
                elif op == 3:
                    shape = list(a.shape) or [1]
                    shape[rng.integers(len(shape))] = int(rng.choice([0, 1, 2, 17, 33]))
                    cond[name] = np.zeros(shape, a.dtype)
                elif op == 4:
                    cond[name] = a.astype(dtypes[rng.integers(len(dtypes))])
                else:
                    cond[name] = np.full(a.shape, rng.choice([-1, 4, 5, 2 ** 31 - 1]), a.dtype) if a.dtype.kind == "i" \
                        else a
            try:
                got = contract.check_cond(cond)
                paired = contract.null_batch(null, got) if got and next(iter(got.values())).shape[1:] == \
                    null[contract.names[0]].shape[1:] else None
            except VditError as e:
                assert "\n" not in str(e) and str(e), repr(e)
                continue
            assert list(got) == list(contract.names)
            for spec in contract.cond:
                assert got[spec.name].dtype == np.dtype(spec.dtype) and got[spec.name].ndim == len(spec.shape)
            if paired is not None:
                assert {k: a.shape for k, a in paired.items()} == {k: a.shape for k, a in got.items()}


# ---- diffusers model directories: config values, index files, shard headers, links, special files ------
def _dir_one_line_or_ok(path, load: bool):
    """`vdit info` on a (mutated) diffusers directory, then loading it: accepted or one VditError line."""
    from vdit_deploy.describe import describe_diffusers_dir
    from vdit_deploy.sources import is_diffusers_dir, load_source

    def check():
        if is_diffusers_dir(path):
            describe_diffusers_dir(path)
        if load:
            load_source(path)
    assert_one_line_or_ok(check)


def _copy_latte(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (shutil.copy if p.name == "config.json" else os.link)(p, dst / p.name)
    return dst


def test_fuzz_diffusers_config(tiny_latte, tmp_path):
    """Mutated Latte config.json values: described and built (tiny: the widths the weights do not have
    are refused on the meta device, before allocation) or refused in one line."""
    good = json.loads((tiny_latte / "config.json").read_text())
    case = _copy_latte(tiny_latte, tmp_path / "m")
    for i, doc in enumerate(mutations(6, good, 120)):
        (case / "config.json").write_text(json.dumps(doc))
        _dir_one_line_or_ok(case, load=i % 2 == 0)


def test_fuzz_diffusers_index_and_shards(tiny_latte, tmp_path):
    """A sharded copy (index + 2 shards): the index JSON mutated, shard headers' bytes flipped, shards
    truncated: the same files are read by info and the loader, or one line refuses."""
    from safetensors.numpy import load_file, save_file

    state = load_file(tiny_latte / "diffusion_pytorch_model.safetensors")
    keys = sorted(state)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(tiny_latte / "config.json", sharded / "config.json")
    shutil.copy(tiny_latte / "scheduler_config.json", sharded / "scheduler_config.json")
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    weight_map = {k: names[i % 2] for i, k in enumerate(keys)}
    for name in names:
        save_file({k: state[k] for k in keys if weight_map[k] == name}, str(sharded / name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    _dir_one_line_or_ok(sharded, load=True)                        # the good one loads
    rng = np.random.default_rng(7)
    for i, doc in enumerate(mutations(8, index, 80)):
        case = _copy_latte(sharded, tmp_path / f"i{i}")
        (case / "diffusion_pytorch_model.safetensors.index.json").unlink()
        (case / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(doc))
        _dir_one_line_or_ok(case, load=i % 4 == 0)
        shutil.rmtree(case)
    for i in range(60):
        case = _copy_latte(sharded, tmp_path / f"h{i}")
        shard = case / names[i % 2]
        data = bytearray(shard.read_bytes())
        shard.unlink()
        n = int.from_bytes(data[:8], "little")
        if i % 3 == 0:
            data = data[:rng.integers(0, len(data))]              # truncated anywhere
        else:
            for _ in range(rng.integers(1, 4)):                    # bytes flipped in the length or the header
                pos = int(rng.integers(0, 8 + n))
                data[pos] = int(rng.integers(0, 256))
        shard.write_bytes(bytes(data))
        _dir_one_line_or_ok(case, load=i % 3 == 0)
        shutil.rmtree(case)


SPECIAL = [(target, kind) for target in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json")
           for kind in ("dev-zero", "fifo", "directory", "outside", "dangling", "self-loop")
           if (target, kind) != ("scheduler_config.json", "outside")]   # ../scheduler/ is a pipeline's layout


@pytest.mark.parametrize("target, kind", SPECIAL, ids=[f"{t}-{k}" for t, k in SPECIAL])
def test_diffusers_special_files(tiny_latte, tmp_path, target, kind):
    """Each file of the directory replaced by a link to /dev/zero, a FIFO, a directory, a link to a file
    outside (model files: they are hashed), a dangling link or a link loop: refused in one line, at once
    (a FIFO never blocks)."""
    import time

    case = _copy_latte(tiny_latte, tmp_path / "d")
    (case / target).unlink()
    outside = tmp_path / "outside"
    shutil.copy(tiny_latte / target, outside)
    make = {"dev-zero": lambda p: p.symlink_to("/dev/zero"), "fifo": lambda p: os.mkfifo(p), "directory": lambda p: p.mkdir(),
            "outside": lambda p: p.symlink_to(outside), "dangling": lambda p: p.symlink_to(tmp_path / "nothing"),
            "self-loop": lambda p: p.symlink_to(p)}
    make[kind](case / target)
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["export", str(case), "--out", str(tmp_path / "x"), "--no-verify"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1 and result.output.count("\n") == 1 and result.output.startswith("Error: "), \
        result.output
    assert time.perf_counter() - start < 30 and not (tmp_path / "x").exists()
