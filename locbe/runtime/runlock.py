"""One process per run directory: an exclusive ``fcntl.flock`` on a lock file beside the directory.

``locbe train``, ``locbe eval`` (when it writes into a run directory) and ``locbe reproduce`` hold the lock of
their run directory while they run; a second process that wants the same directory is refused at once with one
line naming the holder (PID, host, command, start time), read from the lock file. The kernel releases a flock when
its holder dies, however it dies (kill -9 included), so a lock left by a killed run is taken over by the next one
without anyone deleting anything; the file itself stays (deleting it would race with a process opening it).

The file is ``<parent>/.<name>.lock``, beside the directory rather than in it, so that ``--force-new`` can move
the directory aside while the lock is held and the lock does not need the directory to exist yet. The lock is
re-entrant within a process (``reproduce`` holds ``<out>`` and then trains into it). Under torchrun only rank 0
takes it (the callers decide).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from locbe.errors import RunDirError

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the rest works)
    fcntl = None

_HELD: dict[str, tuple[int, int]] = {}  # lock file -> (fd, depth) held by this process


def lock_path(run_dir: str | Path) -> Path:
    run_dir = Path(os.path.abspath(run_dir))
    return run_dir.with_name(f".{run_dir.name}.lock")


def holder(path: Path) -> dict:
    """What the lock file says about its holder ({} when unreadable)."""
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe(info: dict) -> str:
    since = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if isinstance(since, int | float) else "?"
    return (f"PID {info.get('pid', '?')} on host {info.get('host', '?')} ({info.get('command', '?')}, "
            f"since {when})")


def acquire(run_dir: str | Path, command: str) -> Path | None:
    """Take the lock of ``run_dir`` or raise ``RunDirError`` naming its holder. Returns the lock file (None where
    the platform has no flock)."""
    if fcntl is None:
        return None
    path = lock_path(run_dir)
    key = str(path)
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunDirError(f"{Path(run_dir)} is in use by {describe(holder(path))}: one process per run directory; "
                          f"wait for it to end, or choose another --out (lock file {path})") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 3),
            "command": command, "argv": sys.argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _HELD[key] = (fd, 1)
    return path


def release(path: Path | None) -> None:
    if path is None or str(path) not in _HELD:
        return
    fd, depth = _HELD[str(path)]
    if depth > 1:
        _HELD[str(path)] = (fd, depth - 1)
        return
    del _HELD[str(path)]
    try:
        os.ftruncate(fd, 0)  # no stale holder named in the file (a new holder rewrites it anyway)
    except OSError:
        pass
    os.close(fd)  # closing the last descriptor releases the flock


@contextmanager
def run_dir_lock(run_dir: str | Path, command: str, take: bool = True) -> Iterator[Path | None]:
    """Hold the lock of ``run_dir`` for the block (nothing when ``take`` is false: torchrun ranks other than 0)."""
    path = acquire(run_dir, command) if take else None
    try:
        yield path
    finally:
        release(path)
