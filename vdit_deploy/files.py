"""Atomic artifact writes and content hashes: an artifact is either complete or absent."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False, marker: str | None = None):
    """Yield a temporary sibling of `path`; move it onto `path` only if the block succeeds.

    A directory artifact replaces an existing directory only when that one is empty or holds
    `marker` (an earlier artifact of the same kind): `--out src/` must never swallow a source tree."""
    path = Path(path)
    if is_dir:
        check_replaceable(path, marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
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


def sha256_files(paths, chunk: int = 1 << 20) -> str:
    """One sha256 over the bytes of several files, in order (an .onnx and its external data)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return sha256_files([path])
