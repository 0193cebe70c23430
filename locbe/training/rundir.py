"""A run directory is bound to the config that made it.

``<out>/config.json`` records the config of the steps in ``<out>``. Continuing (``--resume``, or
``reproduce`` reusing ``final.pth``) with a config whose result-changing fields differ
(``TrainConfig.config_hash``) is refused with the differing fields named; ``--force-new`` moves the
old run aside (``<out>.old-<UTC time>``) and starts over, or pick another ``--out``. A fresh start
never appends to an old run's logs, and a resume cuts the logs back to the resumed step, so every
step appears once. Temp files left by a write that was killed (``.NAME.tmpPID``) are removed.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

from locbe.config import NOT_HASHED, TrainConfig
from locbe.errors import ConfigError, MissingPathError, RunDirError
from locbe.runtime.fileio import atomic_write_text

LOGS = ("log.jsonl", "val.jsonl")
# how to continue after a stop; `locbe reproduce` has no --resume: it resumes by itself
RESUME_HINT = "`locbe train ... --resume` (same flags) or the same `locbe reproduce` command continues"
# the same, for the command that runs ("free space and <this>")
RERUN = {"train": "rerun with --resume",
         "reproduce": "rerun the same `locbe reproduce` command (it resumes by itself; it has no --resume)"}
_STALE_TMP = re.compile(r"^\..+\.tmp\d+(\.[A-Za-z0-9]+)?$")  # locbe.runtime.fileio.atomic_path's temp names
_ABSENT = object()


def checkpoint_paths(out_dir: str | Path) -> tuple[Path, Path]:
    ckpt = Path(out_dir) / "checkpoints"
    return ckpt / "last.pth", ckpt / "final.pth"


def stored_config(out_dir: str | Path) -> dict | None:
    """The config recorded in ``out_dir/config.json``, or in a checkpoint when that file is missing."""
    out_dir = Path(out_dir)
    path = out_dir / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunDirError(f"{path} is unreadable ({e}); the run directory is damaged: use --force-new "
                              "to move it aside, or choose another --out") from e
    for ckpt in checkpoint_paths(out_dir):
        if ckpt.is_file():
            import torch  # only for runs written before config.json existed

            return torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("config")
    return None


def config_differences(stored: dict, cfg: TrainConfig) -> list[str]:
    """``field: old -> new`` for every result-changing field that differs (paths and logging ignored).
    A field that a stored config predates counts with its default (a field is added with the default that
    keeps the earlier behaviour)."""
    current = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as stored
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))
    keys = sorted((set(stored) | set(current)) - set(NOT_HASHED))
    diffs = []
    for k in keys:
        old, new = stored.get(k, defaults.get(k, _ABSENT)), current.get(k, _ABSENT)
        if old != new:
            show = lambda v: "(absent)" if v is _ABSENT else json.dumps(v)
            diffs.append(f"{k}: {show(old)} -> {show(new)}")
    return diffs


def check_same_config(out_dir: str | Path, cfg: TrainConfig, action: str) -> None:
    """Raise ``ConfigError`` naming the differing fields when ``out_dir`` was made with another config."""
    stored = stored_config(out_dir)
    if stored is None:
        return
    diffs = config_differences(stored, cfg)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise ConfigError(f"cannot {action}: {out_dir} was made with another config ({shown}). Use the same "
                          "settings, or --force-new to move the old run aside and start over, or another --out")


def finished_step(cfg: TrainConfig) -> int | None:
    """The step of ``<out>/checkpoints/final.pth`` when ``cfg.out_dir`` holds a finished run of this config
    (``ConfigError`` if it was made with another), else None: ``--resume`` there has nothing to do."""
    _, final = checkpoint_paths(cfg.out_dir)
    if not final.is_file():
        return None
    check_same_config(cfg.out_dir, cfg, "resume")
    import torch

    return int(torch.load(final, map_location="meta", weights_only=True, mmap=True)["step"])


def prepare(cfg: TrainConfig, *, resume: bool, force_new: bool, is_main: bool) -> None:
    """Check that this invocation may use ``cfg.out_dir`` and tidy it (rank 0 writes); raises otherwise."""
    out = Path(cfg.out_dir)
    last, final = checkpoint_paths(out)
    if resume and force_new:
        raise ConfigError("--resume continues the run in --out, --force-new starts a new one there: pass one")
    if force_new and out.is_dir() and any(out.iterdir()):
        if is_main:
            archive = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            out.rename(archive)
            print(f"--force-new: moved the previous run in {out} to {archive}")
        return
    if resume:
        if not last.is_file():
            hint = (f"the run there finished ({final} exists)" if final.is_file()
                    else "nothing to resume: run without --resume to start there")
            raise MissingPathError(f"--resume: no checkpoint {last}; {hint}")
        check_same_config(out, cfg, "resume")
    elif last.is_file() or final.is_file():
        raise RunDirError(f"{out} holds a run ({last if last.is_file() else final} exists): pass --resume to "
                          "continue it, --force-new to move it aside and start over, or choose another --out")
    if is_main and out.is_dir():
        remove_stale_temp_files(out)
        if not resume:  # a run that never reached a checkpoint: its logs describe nothing that is kept
            for name in LOGS:
                (out / name).unlink(missing_ok=True)


def remove_stale_temp_files(out_dir: str | Path) -> list[Path]:
    """Delete ``.NAME.tmpPID`` files that a killed write left behind under ``out_dir``."""
    removed = []
    for p in Path(out_dir).rglob(".*.tmp*"):
        if p.is_file() and _STALE_TMP.match(p.name):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def truncate_logs(out_dir: str | Path, step: int) -> None:
    """Keep only log rows of steps ``<= step`` (the resumed checkpoint's), so no step is logged twice."""
    for name in LOGS:
        path = Path(out_dir) / name
        if not path.is_file():
            continue
        lines = path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if int(row.get("step", 0)) <= step:
                kept.append(line)
        if kept != lines:
            atomic_write_text(path, "".join(line + "\n" for line in kept))


def start(out_dir: str | Path, step: int, config: dict, env: dict) -> None:
    """Rank 0, once the state is loaded: logs cut back to ``step``, then the config and environment recorded."""
    from locbe.runtime.fileio import atomic_write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    truncate_logs(out_dir, step)
    atomic_write_json(out_dir / "config.json", config)
    atomic_write_json(out_dir / "env.json", env)


@contextlib.contextmanager
def hold(out_dir: str | Path, command: str, info, device) -> Iterator[None]:
    """One process per run directory (``locbe.runtime.runlock``): rank 0 takes the lock of ``out_dir`` for the
    block; when it cannot, every rank stops (the refusal names the holder)."""
    from locbe.runtime.runlock import acquire, release
    from locbe.training.distributed import any_rank

    path, error = None, None
    if info.is_main:
        try:
            path = acquire(out_dir, command)
        except RunDirError as e:
            error = e
    if any_rank(error is not None, info.world_size, device):
        raise error or RunDirError(f"{out_dir} is in use by another process (rank 0 could not lock it)")
    try:
        yield
    finally:
        release(path)
