"""``--tensorboard``: the scalars of ``log.jsonl`` (every loss term, the total, the learning rate) also as
TensorBoard events in ``<out>/tensorboard/``, for those who watch a run live (``tensorboard --logdir <out>``).

The optional extra ``tensorboard`` (``pip install -e ".[tensorboard]"``) installs what it needs; without it the
run stops before anything is written, with one line saying so. A resumed run drops the events after the
resumed step (``purge_step``), as the logs are cut back, so each step appears once.
"""

from __future__ import annotations

from pathlib import Path

from locbe.errors import ConfigError

EVENTS_DIR = "tensorboard"


def require_tensorboard() -> None:
    """Raise ``ConfigError`` (exit 2, one line) when the tensorboard package cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--tensorboard needs the tensorboard package ({e}): pip install -e \".[tensorboard]\" "
                          "(or pip install tensorboard), or leave --tensorboard out; log.jsonl and curves.png are "
                          "written either way") from None


def scalar_tags(losses: dict[str, float]) -> dict[str, float]:
    """TensorBoard tag -> value for one logged step's losses: ``loss/<term>`` and ``loss/total``."""
    return {f"loss/{k}": float(v) for k, v in losses.items()}


class TensorBoardLog:
    """Writes one logged step's scalars; ``flush`` at checkpoints, ``close`` at the end."""

    def __init__(self, out_dir: str | Path, start_step: int = 0):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(out_dir) / EVENTS_DIR
        self.writer = SummaryWriter(log_dir=str(self.path), purge_step=start_step if start_step > 0 else None)

    def log(self, step: int, lr: float, losses: dict[str, float]) -> None:
        for tag, value in scalar_tags(losses).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.add_scalar("lr", float(lr), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
