"""Atomic artifact writes and content hashes: an artifact is either complete or absent.

Temporaries are hidden siblings named `.<artifact>.<pid>.<random>.tmp`: the pid says whose they are,
so the next run that writes the same artifact removes those of processes that no longer exist (a run
killed with SIGKILL, or by a power cut, leaves nothing behind for good). SIGTERM is turned into an
exception by the CLI, so a terminated run removes its own temporaries on the way out.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from vdit_deploy.errors import VditError


def check_replaceable(path: Path, marker: str | None) -> None:
    """Refuse (one line) to overwrite a directory that is not empty and not an earlier artifact."""
    if not path.exists():
        return
    if not path.is_dir():
        raise VditError(f"{path} exists and is not a directory")
    if any(path.iterdir()) and not (marker and (path / marker).exists()):
        raise VditError(f"refusing to replace {path}: it is not empty and holds no {marker or 'artifact'} "
                        f"from an earlier run; choose a new or empty directory")


def check_output(path: str | os.PathLike, is_dir: bool = False, marker: str | None = None) -> Path:
    """Everything that would make writing `path` fail, checked before the expensive work that makes it:
    a directory where a file goes (or the reverse), a foreign directory, a parent that is a file, and a
    place this process cannot create files in (read-only, /proc, no permission). Creates nothing."""
    path = Path(path)
    if is_dir:
        check_replaceable(path, marker)
    elif path.is_dir():
        raise VditError(f"{path} is a directory; give a file name")
    parent = path.parent
    while not parent.exists():      # the nearest existing ancestor is where the parents would be made
        parent = parent.parent
    if not parent.is_dir():
        raise VditError(f"cannot write {path}: {parent} is not a directory")
    try:   # a real probe: os.access says yes to root on read-only file systems and /proc
        fd, probe = tempfile.mkstemp(prefix=".vdit-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise VditError(f"cannot write {path}: {e.strerror or e} in {parent}") from None
    return path


def check_inside(path: Path, root: Path) -> Path:
    """Refuse a file that is, or goes through, a link leading out of `root` (copying it would copy
    whatever the link points at into an artifact)."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise VditError(f"{path} is a link to {path.resolve()}, outside {root}; copy the file itself there")
    return path


JSON_LIMIT = 16 << 20            # config.json, scheduler configs, safetensors indexes: far below this


def open_regular(path: str | os.PathLike, root: str | os.PathLike | None = None, what: str = "file"):
    """Open an untrusted file for reading: a regular file (not a FIFO, device or directory, also when
    reached through a link: /dev/zero would be read forever, a FIFO blocks), inside `root` when given.
    Returns (binary file object, its size)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)     # O_NONBLOCK: opening a FIFO does not hang
    except OSError as e:
        raise VditError(f"cannot read {path}: {e.strerror or e}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise VditError(f"{path} is not a regular file (a device, FIFO or directory): the {what} must be one")
    if root is not None and not path.resolve().is_relative_to(Path(root).resolve()):
        os.close(fd)
        raise VditError(f"{path}: the {what} leads to {path.resolve()}, outside {root}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), info.st_size


def read_bounded(path: str | os.PathLike, limit: int = JSON_LIMIT, root=None, what: str = "file") -> bytes:
    """All of an untrusted regular file, refused (before reading) when larger than `limit`."""
    f, size = open_regular(path, root, what)
    with f:
        if size > limit:
            raise VditError(f"{path} is {size:,} bytes: too large for a {what} (at most {limit:,})")
        return f.read(limit + 1)[:limit]


def read_json(path: str | os.PathLike, what: str = "JSON file", root=None, limit: int = JSON_LIMIT):
    """An untrusted JSON file -> its value: regular, bounded, valid (one line naming the file when not)."""
    data = read_bounded(path, limit, root, what)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:   # JSONDecodeError, UnicodeDecodeError, nested too deep
        raise VditError(f"{path} is not valid JSON: {' '.join(str(e).split())[:100]}") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:    # alive, someone else's
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove `.<name>.<pid>.*.tmp*` siblings of `path` left by processes that are gone, and a
    `.<name>.old` left between the two renames of a directory swap. Returns what was removed."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\..*\.tmp")
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        m = pattern.match(entry.name)
        stale = (m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1)))) \
            or entry.name == f".{path.name}.old"
        if stale:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def remove_dead_temporaries(directory: Path) -> list[Path]:
    """Every `.<name>.<pid>.*.tmp*` in `directory` whose process is gone (whatever artifact it was for:
    a SIGKILLed `calibrate fp16` leaves `.denoiser.fp16.onnx.<pid>.<random>.tmp.onnx`)."""
    pattern = re.compile(r"^\..+?\.(\d+)(?:\.[^.]*)?\.tmp")
    removed = []
    if not Path(directory).is_dir():
        return removed
    for entry in Path(directory).iterdir():
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() \
                else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def temp_dir(near: str | os.PathLike):
    """A scratch directory beside `near` (same file system: renames out of it are atomic), removed
    when the block ends, and by the next run if this process is killed."""
    near = Path(near)
    near.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(near)
    tmp = Path(tempfile.mkdtemp(prefix=f".{near.name}.{os.getpid()}.", suffix=".tmp", dir=near.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False, marker: str | None = None):
    """Yield a temporary sibling of `path`; move it onto `path` only if the block succeeds.

    A directory artifact replaces an existing directory only when that one is empty or holds
    `marker` (an earlier artifact of the same kind): `--out src/` must never swallow a source tree."""
    path = check_output(path, is_dir, marker)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VditError(f"cannot create {path.parent}: {e.strerror or e}") from None
    remove_stale_temporaries(path)
    prefix = f".{path.name}.{os.getpid()}."
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp" + path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o755 if is_dir else 0o644)   # mkdtemp/mkstemp create private entries
        if is_dir and path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def save_npy(path: Path, array, artifact: str | os.PathLike) -> None:
    """np.save, and a full disk said as such: numpy reports it as "786432 requested and 34784 written"."""
    import numpy as np

    try:
        with open(path, "wb") as f:       # a file object: np.save would append .npy to a name without it
            np.save(f, array)
    except OSError as e:
        free = shutil.disk_usage(Path(path).parent).free
        cause = e.strerror or ("disk full" if "requested and" in str(e) else str(e))
        raise VditError(f"cannot write {Path(path).name} of {artifact} ({array.nbytes:,} bytes, "
                        f"{free:,} free on its disk): {cause}") from None


def load_npy(path: Path, root: Path, shape=None):
    """A .npy array from an untrusted directory: a regular file inside it, its header read first and its
    shape (when given) checked before the array is allocated; never unpickled."""
    import numpy as np

    f, size = open_regular(path, root, ".npy array")
    with f:
        try:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
            header_shape, _, dtype = read(f)
        except (ValueError, OSError, EOFError, SyntaxError) as e:
            raise VditError(f"{path} is not a readable .npy array: {' '.join(str(e).split())[:120]}") from None
        if shape is not None and list(header_shape) != list(shape):
            raise VditError(f"{path} holds shape {list(header_shape)}, expected {list(shape)}")
        if dtype.hasobject or int(np.prod(header_shape, dtype=object)) * dtype.itemsize > size - f.tell():
            raise VditError(f"{path} is not a readable .npy array (truncated, or holds objects)")
        f.seek(0)
        return np.load(f, allow_pickle=False)


def sha256_files(paths, chunk: int = 1 << 20) -> str:
    """One sha256 over the bytes of several files, in order (an .onnx and its external data)."""
    digest = hashlib.sha256()
    for path in paths:
        f, _ = open_regular(path, what="hashed file")    # /dev/zero would be hashed forever
        with f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return sha256_files([path])
