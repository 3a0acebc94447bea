"""`vdit serve REPO`: NVIDIA Triton Inference Server on a local model repository, the `tritonserver` binary
that nvidia-pytriton ships, its Python backend running in this Python.

nvidia-pytriton pins numpy < 2 for its whole environment, and its Python-backend stub is built against
numpy 1 (under numpy 2 it misreads tensors: a request's [1, 2] arrived as [1, 1]). So the server gets a
directory of its own, apart from this environment: `vdit serve-setup` installs nvidia-pytriton and numpy 1
there (pip --target, no dependencies: the binary, its libraries and stubs are all that is used), by
default ~/.cache/vdit-deploy/triton (VDIT_TRITON_DIR, or --dir, to put it elsewhere). In it:

    pytriton/tritonserver/bin/tritonserver
    pytriton/tritonserver/backends/python/          libtriton_python.so, triton_python_backend_utils.py
    pytriton/tritonserver/python_backend_stubs/3.X/triton_python_backend_stub   one per Python version
    nvidia_pytriton.libs/                           the server's shared libraries
    numpy/                                          1.26: what the stubs import

and, as pytriton does at start, the stub of this Python goes into backends/python/ (here: links in a
temporary backend directory that lives as long as the server). The stub embeds libpython and finds its
packages from the first `python3` on PATH, in isolated mode (PYTHONPATH ignored). So the server is started
with this interpreter's library and, first on PATH, a scratch venv of this interpreter whose one .pth puts
the server directory and then this environment's site directories on the path: the repository's Python
models (export/triton_python.py) import numpy 1 from the server directory and this vdit_deploy and its
onnxruntime from here, while this environment keeps its numpy 2. That server has only the Python backend: repositories from
`vdit serve-export --backend python`.

Nothing binds beyond loopback unless a host is given. The server runs in its own process group (a
terminal's Ctrl-C reaches `vdit serve`, which stops it) and dies with the thread that started it, even on
SIGKILL (PR_SET_PDEATHSIG); its Python stubs do not, but they and their shared memory are named after
the starting process, so a later start kills the stubs and removes the /dev/shm regions a killed one
left: a restart needs no repair. The server writes
nothing into the repository.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vdit_deploy.errors import VditError
from vdit_deploy.files import _pid_alive, temp_dir

SETUP = "vdit serve-setup"
SERVER_PACKAGES = ("nvidia-pytriton==0.7.0", "numpy<2")   # what `vdit serve-setup` installs, nothing else
ENV_DIR = "VDIT_TRITON_DIR"
LOOPBACK = "127.0.0.1"
DEFAULT_PORTS = (8000, 8001, 8002)    # HTTP, gRPC, metrics: Triton's own defaults
SHM = Path("/dev/shm")
SHM_PREFIX = "vdit-triton-"           # + the starting process's pid + "-": the Python stubs' shared memory
NO_GPU_NOISE = re.compile(r"CudaDriverHelper|NVML|DCGM|pinned memory|CUDA driver")


def server_dir(path=None) -> Path:
    """Where the server lives: `path`, else $VDIT_TRITON_DIR, else ~/.cache/vdit-deploy/triton."""
    if path:
        return Path(path).expanduser()
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "vdit-deploy" / "triton"


@dataclass(frozen=True)
class Distribution:
    """A server directory of `vdit serve-setup`: the binary, backends, this Python's stub, the server's
    libraries, and the numpy 1 the stub imports (PYTHONPATH)."""
    binary: Path
    backends: Path
    stub: Path
    libs: Path
    site: Path

    @classmethod
    def find(cls, path=None) -> "Distribution":
        site = server_dir(path)
        root = site / "pytriton" / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        dist = cls(root / "bin" / "tritonserver", root / "backends", root / "python_backend_stubs" / version /
                   "triton_python_backend_stub", site / "nvidia_pytriton.libs", site)
        if not dist.binary.is_file():
            raise VditError(f"no tritonserver in {site}: `{SETUP}` installs it there (nvidia-pytriton, numpy 1; "
                            f"{ENV_DIR} or --dir for another directory)")
        if not dist.stub.is_file():
            have = ", ".join(sorted(p.name for p in dist.stub.parent.parent.glob("*"))) or "none"
            raise VditError(f"nvidia-pytriton has no Python backend stub for Python {version} (it has {have}); "
                            "run vdit serve with one of those Pythons")
        numpy = sorted(site.glob("numpy-*.dist-info"))
        if len(numpy) != 1 or not numpy[0].name.startswith("numpy-1."):
            raise VditError(f"{site} has no numpy 1 for the server's Python backend (its stub is built against "
                            f"numpy 1): `{SETUP} --dir {site}` again")
        return dist


def setup(path=None, echo=print) -> Path:
    """`vdit serve-setup`: pip install --no-deps --target the server directory nvidia-pytriton and numpy 1,
    into a scratch directory beside it that replaces it only once complete. Nothing when it is set up."""
    site = server_dir(path)
    try:
        Distribution.find(site)
        echo(f"{site}: tritonserver set up already")
        return site
    except VditError:
        pass
    try:
        site.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VditError(f"cannot create {site.parent}: {e.strerror or e}") from None
    with temp_dir(site) as tmp:
        echo(f"installing {' '.join(SERVER_PACKAGES)} into {site} (about 230 MB)")
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-input",
                   "--disable-pip-version-check", "--target", str(tmp), *SERVER_PACKAGES]
        try:
            code = subprocess.run(command, stdin=subprocess.DEVNULL).returncode
        except OSError as e:
            raise VditError(f"cannot run pip: {e.strerror or e}") from None
        if code:
            raise VditError(f"pip install {' '.join(SERVER_PACKAGES)} failed (exit {code}; its messages are above)")
        Distribution.find(tmp)
        if site.is_symlink() or site.is_file():
            site.unlink()
        elif site.exists():
            shutil.rmtree(site)     # an incomplete or older server directory: only find() says it is whole
        os.replace(tmp, site)
    Distribution.find(site)
    echo(f"set up {site}: vdit serve runs its tritonserver")
    return site


def free_port(host: str = LOOPBACK, port: int = 0, what: str = "") -> int:
    """`port` if nothing listens on it now (0: one the kernel chooses), else one line naming the option."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise VditError(f"cannot listen on {host}:{port}{f' ({what})' if what else ''}: {e.strerror or e}; "
                            "another port, or 0 for a free one") from None
        return s.getsockname()[1]


def repository_backends(repo: Path) -> dict[str, str]:
    """model name -> the backend its config.pbtxt names (platforms mapped to theirs)."""
    platforms = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt", "pytorch_libtorch": "pytorch"}
    out = {}
    for config in sorted(repo.glob("*/config.pbtxt")):
        text = config.read_text(errors="replace")
        backend = re.search(r'^\s*backend:\s*"([^"]+)"', text, re.M)
        platform = re.search(r'^\s*platform:\s*"([^"]+)"', text, re.M)
        out[config.parent.name] = backend.group(1) if backend else platforms.get(platform.group(1), platform.group(1)) \
            if platform else "?"
    return out


def check_repository(repo: Path, dist: Distribution) -> Path:
    repo = Path(repo)
    backends = repository_backends(repo) if repo.is_dir() else {}
    if not backends:
        raise VditError(f"{repo}: no Triton model repository there (no */config.pbtxt); write one with "
                        "`vdit serve-export EXPORT --triton DIR --backend python`")
    have = {p.name for p in dist.backends.iterdir() if p.is_dir()}
    missing = {m: b for m, b in backends.items() if b not in have}
    if missing:
        model, backend = next(iter(missing.items()))
        raise VditError(f"{repo}/{model} runs on the {backend} backend, which the bundled tritonserver lacks (it has "
                        f"{', '.join(sorted(have))}): write the repository with `vdit serve-export --backend python`, "
                        "or serve it with a full Triton (docs/serving.md)")
    return repo


def _owner_gone(name: str) -> bool:
    """Whether `name` is a stub's shared-memory region name (SHM_PREFIX + the starting process's pid
    + "-...") whose starting process is gone (a server killed with SIGKILL)."""
    m = re.match(rf"{SHM_PREFIX}(\d+)-", name)
    return m is not None and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1)))


def remove_stale_shm() -> list[Path]:
    """Shared memory of Python stubs whose starting process is gone."""
    removed = [e for e in (SHM.glob(SHM_PREFIX + "*") if SHM.is_dir() else []) if _owner_gone(e.name)]
    for entry in removed:
        entry.unlink(missing_ok=True)
    return removed


def kill_orphaned_stubs() -> list[int]:
    """Python stubs of a server whose starting process is gone. The server dies with its starter
    (PR_SET_PDEATHSIG) but its stubs do not: each would hold its model (an ONNX Runtime session) until
    the machine restarts. A stub's argv names its shared memory region, after the starting process."""
    killed = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"triton_python_backend_stub") and any(
                _owner_gone(a.decode(errors="replace")) for a in argv[1:]):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
            except OSError:
                pass
    return killed


def _die_with_parent() -> None:   # in the child, before exec: SIGKILL when the starting thread ends
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


@dataclass
class Addresses:
    host: str
    http: int
    grpc: int
    metrics: int

    def url(self, kind: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{getattr(self, kind)}"


class TritonServer:
    """One tritonserver on `repo`: start() returns once every model is ready, stop() ends it (SIGTERM:
    Triton finishes in-flight requests; SIGKILL to its process group after `exit_timeout`). Ports 0
    are chosen free at start. Use as a context manager."""

    def __init__(self, repo, host: str = LOOPBACK, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                 log: Path | None = None, exit_timeout: float = 30.0, server: Path | None = None):
        self.dist = Distribution.find(server)
        self.repo = check_repository(Path(repo), self.dist)
        self.host, self.ports, self.exit_timeout = host, (http_port, grpc_port, metrics_port), exit_timeout
        self.log = log
        self.process: subprocess.Popen | None = None
        self.addresses: Addresses | None = None
        self._backends = None

    # ---- the command ----
    def command(self, backends: Path, addresses: Addresses) -> list[str]:
        bind = addresses.host
        return [str(self.dist.binary), f"--model-repository={self.repo.resolve()}",
                f"--backend-directory={backends}", "--strict-model-config=true", "--model-control-mode=none",
                f"--http-address={bind}", f"--http-port={addresses.http}",
                f"--grpc-address={bind}", f"--grpc-port={addresses.grpc}",
                f"--metrics-address={bind}", f"--metrics-port={addresses.metrics}", "--allow-gpu-metrics=false",
                f"--exit-timeout-secs={int(self.exit_timeout)}",
                f"--backend-config=python,shm-region-prefix-name={SHM_PREFIX}{os.getpid()}-"]

    def environment(self, python: Path) -> dict:
        """This Python's libpython, and `python` (the stub's view of this environment) first on PATH."""
        env = dict(os.environ)
        libs = [str(self.dist.libs)]
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir and (Path(libdir) / (sysconfig.get_config_var("INSTSONAME") or "-")).is_file():
            libs.insert(0, libdir)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
        env["PATH"] = os.pathsep.join([str(python / "bin"), env.get("PATH", "")])
        env.setdefault("OMP_NUM_THREADS", "1")   # one numpy/BLAS thread per sampler process: they are many
        return env

    def _backend_dir(self, tmp: Path) -> Path:
        """pytriton's layout: the server's backends with this Python's stub beside libtriton_python.so."""
        python = tmp / "backends" / "python"
        python.mkdir(parents=True)
        for f in (self.dist.backends / "python").iterdir():
            if f.is_file():
                (python / f.name).symlink_to(f)
        (python / "triton_python_backend_stub").symlink_to(self.dist.stub)
        return tmp / "backends"

    def _python(self, tmp: Path) -> Path:
        """The stub's Python: a venv of this interpreter whose one .pth adds the server directory (numpy 1)
        and then this environment's site directories (vdit_deploy, onnxruntime...). The stub runs Python
        isolated (PYTHONPATH ignored) and takes its prefix from the first `python3` on PATH."""
        venv = tmp / "python"
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        site_packages = venv / "lib" / version / "site-packages"
        site_packages.mkdir(parents=True)
        (venv / "bin").mkdir()
        base = Path(getattr(sys, "_base_executable", None) or sys.executable)
        for name in ("python", "python3", version):
            (venv / "bin" / name).symlink_to(base)
        (venv / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\n"
                                         f"version = {'.'.join(map(str, sys.version_info[:3]))}\n")
        dirs = [str(self.dist.site)] + site.getsitepackages() + \
            ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
        (site_packages / "vdit-triton.pth").write_text(
            "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
        return venv

    # ---- life ----
    def start(self, timeout: float = 180.0) -> Addresses:
        kill_orphaned_stubs()      # before their shared memory goes: a killed server's stubs still map it
        remove_stale_shm()
        ports = [free_port(self.host, p, f"--{kind}-port") for p, kind in zip(self.ports, ("http", "grpc", "metrics"))]
        self.addresses = Addresses(self.host, *ports)
        self._backends = temp_dir(Path(tempfile.gettempdir()) / "vdit-tritonserver")
        tmp = self._backends.__enter__()
        log = open(self.log or tmp / "tritonserver.log", "ab")
        self.log = Path(log.name)
        try:
            self.process = subprocess.Popen(self.command(self._backend_dir(tmp), self.addresses),
                                            env=self.environment(self._python(tmp)),
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=_die_with_parent)
        except OSError as e:
            self._cleanup()
            raise VditError(f"cannot start {self.dist.binary}: {e.strerror or e}") from None
        finally:
            log.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self.addresses

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.addresses.url('http')}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None:
                raise VditError(f"tritonserver exited with code {self.process.returncode} before it was ready: "
                                f"{self.failure()}")
            if time.monotonic() > deadline:
                raise VditError(f"tritonserver was not ready after {timeout:.0f} s: {self.failure()} (log: {self.log})")
            time.sleep(0.2)

    def failure(self) -> str:
        """What went wrong, in Triton's own words: the first model that failed to load, else the last
        error line of its log (leaving out what a machine without a GPU always logs)."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [ln for ln in lines if re.match(r"^E\d{4} ", ln) and not NO_GPU_NOISE.search(ln)]
        loads = [ln for ln in errors if "failed to load" in ln]
        line = (loads[:1] or errors[-1:] or lines[-1:] or ["no output"])[0]
        line = re.sub(r"^[EIW]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ", "", line).split("\\n")[0].strip('"')
        return " ".join(line.split())[:400]   # Triton's message without the Python traceback after it

    def wait(self) -> int:
        return self.process.wait()

    def stop(self) -> int | None:
        """SIGTERM and wait (in-flight requests finish), then SIGKILL whatever is left of its group."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(self.exit_timeout + 5)
                except subprocess.TimeoutExpired:
                    pass
            self._kill_group()
            code = self.process.wait()
        self._cleanup()
        return code

    def kill(self) -> None:
        """SIGKILL the server alone (what a crash or the OOM killer does), leaving the rest to stop()."""
        self.process.kill()
        self.process.wait()

    def _kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)   # the Python stubs, if any outlived the server
        except (ProcessLookupError, PermissionError):
            pass

    def _cleanup(self) -> None:
        for entry in SHM.glob(f"{SHM_PREFIX}{os.getpid()}-*") if SHM.is_dir() else []:
            entry.unlink(missing_ok=True)
        if self._backends is not None:
            self._backends.__exit__(None, None, None)
            self._backends = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def serve(repo, host: str = LOOPBACK, ports=DEFAULT_PORTS, echo=print, server: Path | None = None) -> int:
    """`vdit serve`: start, print the addresses, run until the server exits or this process is told to
    stop (SIGINT, SIGTERM: the CLI turns both into exceptions, and leaving the block stops the server)."""
    with TritonServer(repo, host, *ports, server=server) as server:
        a = server.addresses
        echo(f"serving {server.repo} (models {', '.join(repository_backends(server.repo))})")
        echo(f"  HTTP     http://{a.url('http')}")
        echo(f"  gRPC     {a.url('grpc')}")
        echo(f"  metrics  http://{a.url('metrics')}/metrics")
        echo(f"  log      {server.log}; Ctrl-C stops it")
        code = server.wait()
        if code:
            raise VditError(f"tritonserver exited with code {code}: {server.failure()}")
    return code
