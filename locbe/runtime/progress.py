"""Progress of every long loop in locbe (training, evaluation, CRF, data checks), in one place.

On a terminal: tqdm's bar, redrawn in place. Anywhere else (stderr redirected to a file, a pipe, a batch
system's log) a bar's carriage returns pile up into one enormous line, so there ``progress_bar`` writes a
plain line instead every ``LINE_EVERY_FRACTION`` of the work or ``LINE_EVERY_SECONDS``, whichever comes
first, with the count, rate, elapsed time, ETA and the loop's read-out (losses), and a last line at the end.

``leave=False`` is for a quick stage whose caller prints its own one-line result (the header check before a
run): on a terminal the bar disappears when done; in a log no line is written unless the stage takes longer than
``LINE_EVERY_SECONDS`` (then the paced lines and a last one), so a quick stage leaves only the caller's line.
"""

from __future__ import annotations

import sys
import time

LINE_EVERY_FRACTION = 0.05
LINE_EVERY_SECONDS = 30.0


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0,
                 disable: bool = False, file=None, leave: bool = True):
    """A tqdm bar when ``file`` (stderr) is a terminal, else a ``LineProgress``; both take ``update``,
    ``set_postfix``, ``close``, iteration and ``with``. ``disable`` gives tqdm's silent bar; ``leave=False``: see
    the module's docstring."""
    from tqdm import tqdm

    file = sys.stderr if file is None else file
    if disable or is_terminal(file):
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=file,
                    dynamic_ncols=True, leave=leave)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, file=file, leave=leave)


class LineProgress:
    """tqdm's interface, written as whole lines (no carriage return) at a readable pace."""

    def __init__(self, iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, file=None, clock=time.monotonic, leave: bool = True):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.initial = self.n = self.last_line_n = initial
        self.file = sys.stderr if file is None else file
        self.clock = clock
        self.start = self.last_line_t = clock()
        self.postfix = ""
        self.closed = False
        self.leave = self.written = leave  # leave=False: quiet until LINE_EVERY_SECONDS have passed
        if leave:
            self._line()

    def _line(self) -> None:
        from tqdm import tqdm

        now = self.clock()
        text = tqdm.format_meter(self.n, self.total, now - self.start, ncols=0, prefix=self.desc, unit=self.unit,
                                 postfix=self.postfix or None, initial=self.initial)
        self.file.write(text + "\n")
        self.file.flush()
        self.last_line_n, self.last_line_t = self.n, now
        self.written = True

    def update(self, n: int = 1) -> None:
        self.n += n
        due_by_count = (self.leave and bool(self.total)
                        and self.n - self.last_line_n >= LINE_EVERY_FRACTION * self.total)
        if due_by_count or self.clock() - self.last_line_t >= LINE_EVERY_SECONDS:
            self._line()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.written and self.n != self.last_line_n:
                self._line()

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
