"""Atomic writes: a directory or file appears complete or not at all.

A run killed mid-save must never leave a half-written checkpoint or model where the next
run (or a user) would load it: everything is written to a temporary sibling first and then
renamed into place (rename is atomic on POSIX filesystems). The temporaries are made with
``os.mkdir`` / ``os.open(..., 0o666)``, not ``tempfile.mkdtemp`` / ``mkstemp``, so what is
renamed into place has the ordinary permissions the umask gives (not 0700 / 0600).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def temporary_sibling(target: str | os.PathLike) -> Path:
    """A fresh hidden name next to ``target`` (same filesystem, so the final rename is atomic)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        ordinary_permissions(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ordinary_permissions(root: str | os.PathLike) -> None:
    """Give ``root`` and everything in it the umask's ordinary modes (0644 / 0755 under umask 022).

    safetensors' ``save_file`` (and so diffusers' ``save_pretrained`` / ``save_lora_weights``)
    creates its files 0600 whatever the umask: weights others must read would be private.
    """
    root = Path(root)
    mask = os.umask(0)
    os.umask(mask)
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
