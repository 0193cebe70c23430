"""User-facing errors and the exit codes of the ``locbe`` command (docs/runs.md "Exit codes").

A ``LocbeError`` is something the operator can fix (a path, a flag, a file, a config): the command
prints its message as one line and exits with the error's ``exit_code``; ``--debug`` adds the
traceback. Anything else is a bug and keeps its traceback. Classes also derive from the builtin
they refine (``ValueError``, ``FileNotFoundError``) so existing ``except`` clauses keep working.
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected error (a bug): traceback printed
EXIT_BAD_INPUT = 2  # a flag, path, config, dataset or checkpoint the operator has to fix (argparse uses 2 too)
EXIT_ACCEPTANCE = 3  # every stage ran but the preset's acceptance line did not hold
EXIT_DIVERGED = 4  # training stopped on a non-finite loss (the last good state is saved)
EXIT_INTERRUPTED = 128  # + the signal number: 130 for SIGINT (Ctrl-C), 143 for SIGTERM; state saved, --resume continues


class LocbeError(Exception):
    """An error the operator can fix; printed as one line by the CLI."""

    exit_code = EXIT_BAD_INPUT


class ToolkitError(LocbeError, RuntimeError):
    """No CUDA toolkit this torch can compile the CUDA backend with (none found, or another CUDA major version)."""


class ConfigError(LocbeError, ValueError):
    """A bad flag or ``--set`` override, or a run directory bound to another config."""


class RunDirError(LocbeError, FileExistsError):
    """The run directory holds a run that this invocation must not silently continue or overwrite."""


class MissingPathError(LocbeError, FileNotFoundError):
    """A file or folder the command needs does not exist."""


class DataError(LocbeError, ValueError):
    """A dataset file is unreadable or inconsistent (names the file)."""


class CheckpointError(LocbeError, ValueError):
    """A checkpoint is unreadable or does not fit the model."""


class AcceptanceError(LocbeError):
    """Every stage ran, but the result misses the preset's acceptance line."""

    exit_code = EXIT_ACCEPTANCE


class Interrupted(LocbeError):
    """SIGINT/SIGTERM: the state was saved at a step boundary; ``--resume`` continues."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = EXIT_INTERRUPTED + self.signum


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line. A DataLoader worker's re-raised error carries the worker's
    whole traceback in its message; the last line of that traceback is the original error."""
    text = str(exc).strip()
    if "Original Traceback" in text:  # torch.utils.data._utils.ExceptionWrapper.reraise
        last = text.splitlines()[-1].strip()
        head, sep, tail = last.partition(": ")
        text = tail if sep and ("." in head or head.endswith(("Error", "Exception"))) else last
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]  # KeyError's str() quotes the message
    return " ".join(text.split()) or type(exc).__name__


class NonFiniteLossError(LocbeError, FloatingPointError):
    """The loss became NaN/inf; the state before that step is saved."""

    exit_code = EXIT_DIVERGED


class CheckpointMismatchError(CheckpointError, KeyError):
    """A checkpoint's tensor names do not match the model."""
