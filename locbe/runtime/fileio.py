"""Atomic, durable file writes: a temp file beside the target, fsync'ed, then ``os.replace`` and an fsync
of the directory, so an interrupted run or a power cut never leaves a half-written (or renamed but
empty) checkpoint, table or label file behind: readers see the old file or the new one. Temp files
of a write that was killed are named ``.NAME.tmpPID``; ``locbe.training.rundir`` removes them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
