"""A digest of a dataset folder for env.json: which data a run read, so that two runs' numbers can be told
apart by their data (issue 25). Contents are hashed when the folder is small (the synthetic sets: 805 files,
a few MB, milliseconds); names and sizes only when it is large (VOC, COCO), so that no run waits on gigabytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

CONTENT_LIMIT_BYTES = 256 * 2**20


def dataset_digest(root: str | Path | None, content_limit: int = CONTENT_LIMIT_BYTES) -> dict | None:
    """{"files", "bytes", "sha256", "hashed": "content" | "names and sizes"} of every file under ``root``
    (sorted relative paths); None when there is no such folder."""
    if root is None or not Path(root).is_dir():
        return None
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    sizes = [p.stat().st_size for p in files]
    by_content = sum(sizes) <= content_limit
    h = hashlib.sha256()
    for path, size in zip(files, sizes):
        h.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        if by_content:
            h.update(path.read_bytes())
    return {"files": len(files), "bytes": sum(sizes), "sha256": h.hexdigest()[:16],
            "hashed": "content" if by_content else "names and sizes"}
