"""Progress of the long phases outside the training loop (tokenizing, packing, encoding labels,
scoring, generating, timing), on stderr: a rich bar on a terminal, else one plain log line every
`BIGML_PROGRESS_SECONDS` seconds (10 by default; CI logs and pipes), and a closing line for phases
that printed any. Nothing ever goes to stdout, which is the product of `bigml generate`.

    with Progress("tokenizing", total=len(docs), unit="documents") as p:
        for batch in ...:
            p.update(len(batch))
    for batch in track(loader, "scoring", unit="batches"):
        ...

Training itself reports through Lightning (bigml.callbacks.progress).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("bigml")
T = TypeVar("T")


def interactive() -> bool:
    """A person is watching: rich progress. Otherwise (pipes, CI) plain lines."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def _rank_zero() -> bool:
    from bigml.ranks import is_global_zero_process

    return is_global_zero_process()


def _count(n: float, unit: str) -> str:
    if unit == "bytes":
        return f"{n / 1e6:,.1f} MB"
    return f"{int(n):,} {unit}"


class Progress:
    def __init__(self, description: str, total: float | None = None, unit: str = "items",
                 interval: float | None = None):
        self.description, self.total, self.unit = description, total, unit
        self.interval = float(interval if interval is not None else os.environ.get("BIGML_PROGRESS_SECONDS", 10))
        self.done = 0.0
        self._bar = None
        self._task = None
        self._printed = False

    def __enter__(self) -> Progress:
        self.start = self._last = time.perf_counter()
        if _rank_zero() and interactive():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def update(self, n: float = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n)
            return
        now = time.perf_counter()
        if now - self._last >= self.interval and _rank_zero():
            self._last = now
            self._printed = True
            log.info("%s: %s", self.description, self._status(now))

    def _status(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        parts = [_count(self.done, self.unit) if not self.total else
                 f"{_count(self.done, self.unit)} of {_count(self.total, self.unit)} ({100 * self.done / self.total:.0f}%)",
                 f"{_count(rate, self.unit)}/s"]
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"eta {datetime.timedelta(seconds=int((self.total - self.done) / rate))}")
        return ", ".join(parts)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self._printed and exc[0] is None:
            log.info("%s: done, %s in %.1f s", self.description, _count(self.done, self.unit),
                     time.perf_counter() - self.start)


def track(iterable: Iterable[T], description: str, total: float | None = None, unit: str = "items") -> Iterator[T]:
    """Iterate with progress (one step per item)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(description, total, unit) as p:
        for item in iterable:
            yield item
            p.update(1)
