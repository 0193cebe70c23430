"""Sharded, resumable evaluation: which images a process evaluates, what it writes as it goes, and how
the per-process confusion matrices become one.

Sharding: the image list is cut into chunks of ``batch_size`` consecutive images (a chunk is one forward
batch where shapes allow); chunk c belongs to rank ``c % world_size``. A chunk's images are batched the
same way whatever the number of processes, so every image's logits, and hence the summed confusion
matrices, are bitwise those of a single process (tests/test_eval_sharded.py runs 2 processes with gloo).

Resume: each rank appends one JSON line per finished image to ``<resume_dir>/part-<fp>-<rank>.jsonl``
(its index, name and the non-zero entries of its confusion contribution per metric), flushed as it is
made; ``fp`` is the fingerprint of what is evaluated (checkpoint tag, options, protocol, image list, also
in ``meta.json``). A restarted evaluation reads every part file of that fingerprint (any earlier world
size), keeps the first record of each image, and evaluates only the rest; a torn last line (killed
mid-write) is ignored. Rank 0 clears a folder of another fingerprint. Each rank counts only the images of
its own chunks, so without a shared filesystem (several nodes) the result is still exact: a record a rank
cannot see is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from locbe.runtime.device import cpu_cores
from locbe.runtime.fileio import atomic_write_json
from locbe.runtime.ranks import RankInfo


def chunks(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]


def my_chunks(n: int, batch_size: int, shard: RankInfo) -> list[list[int]]:
    return [c for k, c in enumerate(chunks(n, batch_size)) if k % shard.world_size == shard.rank]


def crf_workers(requested: int | None, shard: RankInfo) -> int:
    """CRF processes for this rank: as asked, else the CPU cores shared among the node's ranks."""
    if requested is not None:
        return max(1, int(requested))
    return max(1, cpu_cores() // max(1, shard.local_world_size))


# ----------------------------------------------------------------------------- confusion records
def sparse_confusion(pred: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore_index: int = 255) -> list:
    """Non-zero entries ``[[gt * n + pred, count], ...]`` of one image's confusion matrix."""
    from locbe.eval.metrics import ConfusionMatrix

    m = ConfusionMatrix(num_classes, ignore_index).update(pred, gt).matrix.reshape(-1)
    idx = torch.nonzero(m).flatten()
    return [[int(i), int(m[i])] for i in idx]


def add_sparse(matrix: torch.Tensor, entries: list) -> None:
    if entries:
        idx = torch.tensor([e[0] for e in entries], dtype=torch.long)
        val = torch.tensor([e[1] for e in entries], dtype=matrix.dtype)
        matrix.view(-1).index_add_(0, idx, val)


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RecordStore:
    """Per-image confusion records of one evaluation, appended as they are made (see module docstring)."""

    def __init__(self, folder: Path | None, shard: RankInfo, meta: dict):
        self.folder, self.shard = folder, shard
        self.done: dict[int, dict] = {}
        self._file = None
        if folder is None:
            return
        fp = fingerprint(meta)
        meta = {"fingerprint": fp, **meta}
        meta_path = folder / "meta.json"
        if shard.is_main:
            stale = meta_path.is_file() and json.loads(meta_path.read_text()).get("fingerprint") != fp
            if stale:
                shutil.rmtree(folder)
            folder.mkdir(parents=True, exist_ok=True)
            if not meta_path.is_file():
                atomic_write_json(meta_path, meta)
        barrier()
        # every rank makes the folder (other nodes may not share rank 0's disk) and reads only records of
        # this fingerprint, whatever else the folder holds there
        folder.mkdir(parents=True, exist_ok=True)
        for part in sorted(folder.glob(f"part-{fp}-*.jsonl")):
            with open(part) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # torn last line of a killed run
                    if isinstance(rec, dict) and "i" in rec:
                        self.done.setdefault(int(rec["i"]), rec)
        path = folder / f"part-{fp}-{shard.rank}.jsonl"
        torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self._file = open(path, "a")  # noqa: SIM115 - closed in close()
        if torn:
            self._file.write("\n")  # end the torn line, so the next record starts on its own

    def write(self, record: dict) -> None:
        self.done.setdefault(int(record["i"]), record)
        if self._file is not None:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_matrices(matrices: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Sum int64 confusion matrices over ranks (one all-reduce; on the GPU for NCCL)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return matrices
    keys = sorted(matrices)
    flat = torch.stack([matrices[k] for k in keys])
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = flat.to(on)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    return {k: flat[i] for i, k in enumerate(keys)}
