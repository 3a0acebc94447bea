"""A live Triton Inference Server on loopback: nvidia-pytriton's tritonserver running a `serve-export --backend
python` repository of the tiny export, started once for the module (vdit_deploy/serve.py). gRPC requests
through tritonclient against `vdit sample`; concurrency and the denoiser's batch statistics; bad requests;
a client killed mid-request; `vdit serve` killed mid-request and started again on the same repository.
Every request has a client deadline, every wait a bound. Needs `vdit serve-setup` (the server's own
directory, nvidia-pytriton + numpy 1) and tritonclient (`[dev]`): skipped with the reason where either is
missing, and failed instead under CI=true, where the README's test command sets both up.
"""
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vdit_deploy.cli import main
from vdit_deploy.errors import VditError
from vdit_deploy.samplers import SAMPLERS
from vdit_deploy.serve import SHM, SHM_PREFIX, Distribution, TritonServer, free_port


def unavailable(reason):
    if os.environ.get("CI") == "true":   # CI sets it up: a missing server there is a broken test command
        pytest.fail(f"CI=true but no live Triton: {reason}", pytrace=False)
    pytest.skip(f"no live Triton here: {reason}", allow_module_level=True)


try:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
except ImportError as e:
    unavailable(f"tritonclient: {e}; pip install -e '.[dev]'")
try:
    Distribution.find()
except VditError as e:
    unavailable(str(e))

DEADLINE = 60.0     # seconds, each request


def tensor(name, value, kind=None):
    value = np.asarray(value)
    kind = kind or {"int32": "INT32", "int64": "INT64", "float32": "FP32", "float64": "FP64",
                    "object": "BYTES"}[value.dtype.name]
    t = grpcclient.InferInput(name, list(value.shape), kind)
    t.set_data_from_numpy(value)
    return t


def request(labels, seed=0, **options):
    """The sampler's inputs: class labels (y) and any REQUEST_OPTIONS (sampler as text)."""
    kinds = {"seed": np.int64, "steps": np.int32, "order": np.int32, "eta": np.float64, "guidance": np.float64}
    inputs = [tensor("y", np.asarray(labels, np.int32)), tensor("seed", np.array([seed], np.int64))]
    for name, value in options.items():
        array = np.array([value.encode()], object) if name == "sampler" else np.array([value], kinds[name])
        inputs.append(tensor(name, array))
    return inputs


def infer(client, inputs, timeout=DEADLINE):
    return client.infer("vdit_sampler", inputs, client_timeout=timeout).as_numpy("video")


def tree_digest(root: Path) -> str:
    """The repository's files and contents; the bytecode Python writes beside model.py on first load aside."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def repo(tiny_export, tmp_path_factory):
    from vdit_deploy.export.triton import write_triton_repo

    path = tmp_path_factory.mktemp("triton") / "models"
    write_triton_repo(tiny_export, path, backend="python")
    return path


@pytest.fixture(scope="module")
def server(repo):
    with TritonServer(repo) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(server.addresses.url("grpc"))
    yield c
    c.close()


def denoiser_stats(client):
    """(requests, executions, {batch size: executions}) of vdit_denoiser so far (Triton's statistics)."""
    stats = client.get_inference_statistics("vdit_denoiser", as_json=True)["model_stats"][0]
    batches = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0)), batches


def vdit_sample(tmp_path, graph, labels, seed, *options):
    out = tmp_path / f"ref-{seed}-{len(options)}.npy"
    result = CliRunner().invoke(main, ["sample", "--runtime", "ort", "--onnx", str(graph), "--label", labels,
                                       "--seed", str(seed), "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    return np.load(out)


def test_server_binds_loopback_only(server):
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout if os.path.exists("/usr/bin/ss") \
        else ""
    mine = [line for line in out.splitlines() if f"pid={server.process.pid}," in line]
    if not mine:
        pytest.skip("ss cannot list the server's sockets here")
    local = [line.split()[3] for line in mine]    # State Recv-Q Send-Q Local Peer Process
    assert len(local) == 3 and all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")) for a in local), local


@pytest.mark.parametrize("options,cli", [
    ({}, []),                                                  # the export's default: unipc, 15 steps
    ({"sampler": "dpm++", "steps": 6, "order": 1}, ["--sampler", "dpm++", "--steps", "6", "--order", "1"]),
    ({"sampler": "ddim", "steps": 5, "eta": 0.7, "guidance": 3.0},   # stochastic: the noise follows the seed
     ["--sampler", "ddim", "--steps", "5", "--eta", "0.7", "--guidance", "3"]),
])
def test_grpc_request_is_vdit_sample(client, repo, tiny_export, tmp_path, options, cli):
    """The served video is `vdit sample`'s, bit for bit, on the repository's graph for the same seed,
    sampler and labels; and the export's fused step graph gives it too (to float rounding)."""
    served = infer(client, request([1, 3], seed=7, **options))
    assert served.shape == (2, 3, 8, 16, 16) and served.dtype == np.float32
    reference = vdit_sample(tmp_path, repo / "vdit_denoiser" / "1" / "model.onnx", "1,3", 7, *cli)
    assert np.array_equal(served, reference)
    fused = vdit_sample(tmp_path, tiny_export, "1,3", 7, *cli)
    assert np.abs(served - fused).max() < 1e-5


def test_concurrent_requests_are_batched(client):
    """8 loops at once: all succeed with their own seed's video, and the denoiser ran their calls in
    fewer executions than calls, some of them larger than one call's batch of 2 (cond + null)."""
    alone = infer(client, request([2], seed=5))
    before = denoiser_stats(client)
    videos, errors = [None] * 8, []

    def run(i):
        try:
            videos[i] = infer(client, request([2], seed=5 if i == 0 else 100 + i))
        except Exception as e:   # reported below, not lost in the thread
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE + 5)
    assert not errors and all(v is not None and v.shape == (1, 3, 8, 16, 16) for v in videos), errors
    assert np.abs(videos[0] - alone).max() < 1e-5   # batched with others, still its own video
    assert len({v.tobytes() for v in videos}) == 8
    after = denoiser_stats(client)
    calls, executions = (after[0] - before[0]) // 2, after[1] - before[1]
    assert calls == 8 * 15                            # 15 unipc steps each, one call per step
    assert executions < calls, (calls, executions)
    assert max(size for size, n in after[2].items() if n > before[2].get(size, 0)) > 2, after[2]


@pytest.mark.parametrize("inputs,message", [
    (request([1], steps=0), "steps must be between 1 and 1000, got 0"),
    (request([1], steps=10 ** 9), "steps must be between 1 and 1000, got 1000000000"),
    (request([1], sampler="heun-17"), f"sampler must be one of {', '.join(SAMPLERS)}, got 'heun-17'"),
    (request([1], guidance=float("nan")), "guidance must be a finite number, got nan"),
    (request([1], sampler="ddim", eta=float("inf")), "eta must be a finite number, got inf"),
    (request([1], order=3), "unipc order 3 is not run: it needs the two previous x0"),
    (request([1], sampler="ddim", order=2), "ddim has no order option"),
    (request([0, 1, 2, 3, 0]), "y: at most 4 videos per request (the denoiser's batch limit), got 5"),
    (request([9]), "request y holds labels outside 0..4 (4 = null)"),
    (request([1], seed=-1), "seed must be >= 0, got -1"),
    ([tensor("y", np.array([1.0], np.float32))], "inference input 'y' data-type is 'FP32', but model 'vdit_sampler' "
                                                  "expects 'INT32'"),
    ([tensor("y", np.array([[1, 2]], np.int32))], "unexpected shape for input 'y' for model 'vdit_sampler'"),
    ([tensor("seed", np.array([1], np.int64))], "request lacks y: the model takes y: int32(batch)"),
], ids=["steps-0", "steps-1e9", "sampler", "guidance-nan", "eta-inf", "order", "ddim-order", "videos", "label",
        "seed", "dtype", "shape", "missing"])
def test_bad_request_is_invalid_arg_and_server_goes_on(client, inputs, message):
    """Refused before any denoiser call with INVALID_ARG and one line: the project's message for what it
    checks, Triton's for what the config already rules out (dtype, rank)."""
    before = denoiser_stats(client)[0]
    with pytest.raises(InferenceServerException) as refused:
        client.infer("vdit_sampler", inputs, client_timeout=DEADLINE)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    text = refused.value.message()
    assert message in text and "\n" not in text, text
    assert denoiser_stats(client)[0] == before
    assert client.is_server_live() and client.is_model_ready("vdit_sampler")


def test_server_serves_after_bad_requests(client):
    assert infer(client, request([0], sampler="ddim", steps=2)).shape == (1, 3, 8, 16, 16)



def test_readme_client_writes_a_gif(server, tmp_path):
    """The README's tritonclient example as printed there (only its address is this server's): run by
    this Python in a fresh process, it writes served.gif, its 4 videos side by side."""
    from PIL import Image

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("### Serving: NVIDIA Triton"):]
    start = section.index("```python\n") + len("```python\n")
    code = section[start:section.index("\n```", start)]
    assert len(code.splitlines()) <= 10 and '"localhost:8001"' in code
    code = code.replace('"localhost:8001"', repr(server.addresses.url("grpc")))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "served.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 8 and gif.width > 3 * gif.height

CLIENT = """
import numpy as np, sys, tritonclient.grpc as g
c = g.InferenceServerClient(sys.argv[1])
y = g.InferInput("y", [1], "INT32"); y.set_data_from_numpy(np.array([1], np.int32))
s = g.InferInput("sampler", [1], "BYTES"); s.set_data_from_numpy(np.array([b"ddpm"], object))
print("sending", flush=True)
c.infer("vdit_sampler", [y, s])   # 1000 steps: killed long before the end
"""


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout} s")
        time.sleep(0.2)


def test_client_killed_mid_request_leaves_server_healthy(client, server):
    """A client process SIGKILLed during a 1000-step request: its loop stops within a step or two of the
    disconnect (the denoiser's request count stops growing), and the server goes on serving."""
    start = denoiser_stats(client)[0]
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, server.addresses.url("grpc")], stdout=subprocess.PIPE)
    wait_for(lambda: denoiser_stats(client)[0] >= start + 20, 60, "sampling")   # ten steps in
    proc.kill()
    proc.wait(10)
    time.sleep(2)
    stopped = denoiser_stats(client)[0]
    time.sleep(2)
    assert denoiser_stats(client)[0] == stopped, "the abandoned loop kept calling the denoiser"
    assert stopped - start < 2 * 1000
    assert client.is_server_ready()
    assert infer(client, request([3], sampler="ddim", steps=3)).shape == (1, 3, 8, 16, 16)


SERVE = """
import sys
from vdit_deploy.cli import main
sys.argv = ["vdit", "serve", sys.argv[1], "--http-port", sys.argv[2], "--grpc-port", sys.argv[3], "--metrics-port", "0"]
main()
"""


def start_vdit_serve(repo, log):
    """`vdit serve REPO` as a user runs it, in its own process; -> (process, gRPC address) once ready."""
    http, grpc = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(repo), str(http), str(grpc)], stdout=log,
                            stderr=subprocess.STDOUT)
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")

    def ready():
        assert proc.poll() is None, Path(log.name).read_text()
        try:
            return c.is_server_ready()
        except InferenceServerException:
            return False
    wait_for(ready, 180, "ready")
    return proc, c


def shm_of(pid):
    return sorted(SHM.glob(f"{SHM_PREFIX}{pid}-*"))


def test_vdit_serve_killed_mid_request_restarts_with_nothing_to_repair(tiny_export, tmp_path, client):
    """`vdit serve` SIGKILLed during a request: its tritonserver goes with it, the request fails; its
    Python stubs live on; `vdit serve` on the same (unchanged) repository starts, kills those stubs and
    removes the dead one's shared memory,
    serves the module server's video, and stops cleanly on SIGTERM (exit 143, nothing of it left). Two
    sampler instances: Triton stops them one after the other, about a second each."""
    from vdit_deploy.export.triton import write_triton_repo

    repo = tmp_path / "models"
    write_triton_repo(tiny_export, repo, backend="python", sampler_instances=2)
    reference = infer(client, request([1, 2], seed=3))
    digest = tree_digest(repo)
    log = open(tmp_path / "serve.log", "w")
    first, c = start_vdit_serve(repo, log)
    failed = []
    long = threading.Thread(target=lambda: failed.append(pytest.raises(
        InferenceServerException, infer, c, request([1], sampler="ddpm"))))
    long.start()
    time.sleep(1.5)
    assert shm_of(first.pid)
    first.kill()
    first.wait(10)
    long.join(DEADLINE)
    assert failed and failed[0].value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED")
    server_left = lambda: subprocess.run(["pgrep", "-f", f"shm-region-prefix-name={SHM_PREFIX}{first.pid}-"],
                                         capture_output=True).returncode == 0
    wait_for(lambda: not server_left(), 30, "gone (tritonserver of the killed vdit serve)")
    assert tree_digest(repo) == digest
    # its Python stubs outlive it (they are tritonserver's children, not vdit serve's): argv names their region
    stubs_left = lambda: subprocess.run(["pgrep", "-f", f"triton_python_backend_stub .* {SHM_PREFIX}{first.pid}-"],
                                        capture_output=True).returncode == 0

    second, c = start_vdit_serve(repo, log)
    assert not shm_of(first.pid)                   # the killed server's shared memory: removed at start
    wait_for(lambda: not stubs_left(), 10, "gone (the killed server's Python stubs, killed at start)")
    assert np.array_equal(infer(c, request([1, 2], seed=3)), reference)
    second.send_signal(signal.SIGTERM)
    assert second.wait(120) == 143
    assert not shm_of(second.pid) and tree_digest(repo) == digest
    assert "HTTP     http://127.0.0.1:" in (tmp_path / "serve.log").read_text()


def test_text_conditioned_export_served(tiny_latte_export, tmp_path):
    """A text-conditioned, learned-sigma export (tiny diffusers Latte) on its own server: the prompt's
    embeddings (B, L, D) are the request input, and UniPC and DDPM (all 1000 steps, the model's learned
    variance) give `vdit sample --cond`'s video bit for bit; NaN embeddings are refused in one line."""
    from safetensors.numpy import save_file

    from vdit_deploy.export.triton import write_triton_repo

    repo = tmp_path / "models"
    write_triton_repo(tiny_latte_export, repo, backend="python", sampler_instances=1)
    emb = np.random.default_rng(0).standard_normal((2, 16, 32), dtype=np.float32)   # the null's 16 tokens
    save_file({"encoder_hidden_states": emb}, str(tmp_path / "prompts.safetensors"))
    with TritonServer(repo) as server:
        c = grpcclient.InferenceServerClient(server.addresses.url("grpc"))
        for sampler in ("unipc", "ddpm"):
            inputs = [tensor("encoder_hidden_states", emb), tensor("seed", np.array([3], np.int64)),
                      tensor("sampler", np.array([sampler.encode()], object))]
            served = c.infer("vdit_sampler", inputs, client_timeout=DEADLINE).as_numpy("video")
            out = tmp_path / f"{sampler}.npy"
            result = CliRunner().invoke(main, ["sample", "--runtime", "ort", "--onnx",
                                               str(repo / "vdit_denoiser" / "1" / "model.onnx"), "--cond",
                                               str(tmp_path / "prompts.safetensors"), "--seed", "3", "--sampler",
                                               sampler, "--out", str(out)])
            assert result.exit_code == 0, result.output
            assert served.shape == (2, 4, 2, 8, 8) and np.array_equal(served, np.load(out)), sampler
        with pytest.raises(InferenceServerException) as refused:
            c.infer("vdit_sampler", [tensor("encoder_hidden_states", np.full((1, 16, 32), np.nan, np.float32))],
                    client_timeout=DEADLINE)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert refused.value.message() == "request encoder_hidden_states holds NaN or inf"
        c.close()


def test_fixed_batch_family_served(tmp_path_factory, tmp_path):
    """A fixed-batch export (tiny LTX-Video: batch 1, packed tokens, text prompt and its mask) on its own
    server: no dynamic batching, the sampler splits each guided step's 2 rows into calls of 1, and the
    video equals `vdit sample --cond`'s for the same seed and steps."""
    from conftest import family_export
    from safetensors.numpy import save_file

    from test_edge import parse_config
    from vdit_deploy.export.metadata import read_metadata
    from vdit_deploy.export.triton import write_triton_repo

    _, _, export, *_ = family_export("ltx", tmp_path_factory)
    meta = read_metadata(export / "denoiser.onnx")
    assert meta.batch.get("fixed") == 1
    repo = tmp_path / "models"
    write_triton_repo(export, repo, backend="python", sampler_instances=1)
    assert parse_config(repo / "vdit_sampler" / "config.pbtxt").parameters["denoiser_rows"].string_value == "1"
    cond = meta.contract.example_cond(1, np.random.default_rng(3), {"seq": 8})
    save_file(cond, str(tmp_path / "prompt.safetensors"))
    with TritonServer(repo) as server:
        c = grpcclient.InferenceServerClient(server.addresses.url("grpc"))
        inputs = [tensor(name, value) for name, value in cond.items()]
        inputs += [tensor("seed", np.array([5], np.int64)), tensor("steps", np.array([3], np.int32))]
        served = c.infer("vdit_sampler", inputs, client_timeout=DEADLINE).as_numpy("video")
        c.close()
    out = tmp_path / "ref.npy"
    result = CliRunner().invoke(main, ["sample", "--runtime", "ort", "--onnx", str(export), "--cond",
                                       str(tmp_path / "prompt.safetensors"), "--seed", "5", "--steps", "3",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert served.shape == np.load(out).shape and np.array_equal(served, np.load(out))
