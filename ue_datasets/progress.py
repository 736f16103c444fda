"""Progress reporting: tqdm bars on a terminal, plain periodic lines anywhere else.

A tqdm bar redraws itself with carriage returns and cursor moves; written to a log file or a CI
console, nested bars leave escape codes and thousands of half lines. `progress_bar` gives a tqdm bar
when the stream is a terminal and otherwise a `LineProgress`, which has the same small interface
(``update``, ``set_postfix``, iteration, ``close``, context manager) and prints one line now and then:

>>> import io
>>> log = io.StringIO()
>>> with progress_bar(total=40, desc="protect", unit="file", stream=log, interval=0) as bar:
...     bar.update(12)
...     bar.update(28)
>>> print(log.getvalue())  # doctest: +ELLIPSIS
protect: 12/40 file (30%) ... file/s, ~... left
protect: 40/40 file (100%) ...
protect: 40/40 file (100%) in ... s

``UE_DATASETS_PROGRESS_SECONDS`` sets the interval between lines (default 30 s; 0 prints every update).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

INTERVAL_ENV = "UE_DATASETS_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` shows a live bar: a terminal, or a Jupyter/IPython kernel's output."""
    if "ipykernel" in sys.modules and stream in (sys.stdout, sys.stderr):
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False


def duration(seconds: float) -> str:
    """``42.0 s``, ``3 min 05 s``, ``1 h 07 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        minutes, secs = divmod(int(seconds), 60)
        return f"{minutes} min {secs:02d} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


class LineProgress:
    """A progress report as plain lines, for logs: one line at most every ``interval`` seconds, one at the end.

    Args:
        iterable: items to yield while counting them (optional).
        total: the expected count, if known.
        desc: what is counted, at the start of each line.
        unit: the unit of the count.
        initial: the count to start from (work done by an earlier run).
        leave: print the final line on close (nested bars pass ``False`` and stay quiet at the end).
        stream: where lines go (default ``sys.stderr``).
        interval: seconds between lines (default: ``UE_DATASETS_PROGRESS_SECONDS`` or 30).
    """

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, leave: bool = True, stream: TextIO | None = None,
                 interval: float | None = None):
        self.iterable = iterable
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit, self.n, self.leave = total, desc, unit, initial, leave
        self.stream = stream or sys.stderr
        self.interval = _interval() if interval is None else interval
        self._initial = initial
        self._start = self._last = time.monotonic()
        self._postfix = ""
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more; print a line when ``interval`` seconds passed since the last one."""
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._print(self._line(now, final=False))

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        """Values shown at the end of the next line (``loss=0.31``)."""
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.leave and (self.n > self._initial or self.total == 0):
            self._print(self._line(time.monotonic(), final=True))

    def _line(self, now: float, final: bool) -> str:
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        parts = [f"{self.desc}: {count} {self.unit}" if self.desc else f"{count} {self.unit}"]
        if self.total:
            parts.append(f"({100 * self.n / self.total:.0f}%)")
        elapsed = now - self._start
        done = self.n - self._initial
        if final:
            parts.append(f"in {duration(elapsed)}")
        elif elapsed > 0 and done > 0:
            rate = done / elapsed
            parts.append(f"{rate:.0f} {self.unit}/s" if rate >= 100 else f"{rate:.2g} {self.unit}/s")
            if self.total:
                parts[-1] += f", ~{duration(max(0, self.total - self.n) / rate)} left"
        if self._postfix:
            parts.append(f"[{self._postfix}]")
        return " ".join(parts)

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def progress_bar(iterable: Iterable | None = None, *, disable: bool = False, stream: TextIO | None = None,
                 interval: float | None = None, **options: Any) -> Any:
    """A tqdm bar when ``stream`` (default ``sys.stderr``) is a terminal, else a `LineProgress`.

    Takes tqdm's ``total``, ``desc``, ``unit``, ``initial`` and ``leave``; ``interval`` is the
    `LineProgress` one; ``disable=True`` shows nothing.
    """
    stream = stream or sys.stderr
    if not disable and is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, file=stream, **options)
    allowed = {k: v for k, v in options.items() if k in ("total", "desc", "unit", "initial", "leave")}
    bar = LineProgress(iterable, stream=stream, interval=interval, **allowed)
    if disable:
        bar.leave, bar.interval = False, float("inf")
    return bar
