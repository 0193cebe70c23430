"""Atomic, durable file writes: a temp file beside the target, fsync'ed, then ``os.replace`` and an fsync
of the directory, so an interrupted run or a power cut never leaves a half-written (or renamed but
empty) checkpoint, table or label file behind: readers see the old file or the new one. Temp files
of a write that was killed are named ``.NAME.tmpPID``; ``locbe.training.rundir`` removes them.
A write that fails (a full disk included) removes its temp file and leaves the previous file as it was;
``is_disk_full`` tells a full disk from other failures, ``DiskFullError`` says it in one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from locbe.errors import LocbeError

# what torch.save's C++ zip writer raises when a write comes up short (a full disk): "[enforce fail at
# inline_container.cc:672] . unexpected pos 31094144 vs 31094032", "PytorchStreamWriter failed writing file ..."
TORCH_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed")


class DiskFullError(LocbeError, OSError):
    """A write found no space (ENOSPC / EDQUOT, or torch.save's short write); the message says what is kept."""


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in TORCH_SHORT_WRITE)


def free_bytes(path: str | Path) -> int:
    """Free space for an unprivileged writer on the file system that holds ``path`` (or its nearest existing
    parent)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def megabytes(n: int) -> int:
    return max(1, -(-int(n) // 2**20)) if n > 0 else 0


def fsync_path(path: str | Path, directory: bool = False) -> None:
    """Flush a written file (or a directory's entries, after a rename) to the disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms/filesystems cannot open a directory: nothing more to flush there
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path to write; it replaces ``path`` on success and is removed on failure.
    ``suffix`` keeps an extension for writers that infer the format from the name (PIL)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent, directory=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))
