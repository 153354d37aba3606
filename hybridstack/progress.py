"""Progress of long phases: a bar on a terminal, a few log lines elsewhere, nothing when quiet.

A committed Kaggle notebook (or any run whose stderr is a file) would otherwise keep every
carriage-return update of a tqdm bar: thousands of lines for one epoch. There, a phase logs
one line when it has run ``FIRST_LINE_S`` seconds, then at most one every ``EVERY_S`` seconds,
and a last line with its elapsed time if it logged anything before. Short phases stay silent.

``hybridstack --quiet`` silences bars and these lines (and INFO logging) in every process it
starts: the flag travels as ``HYBRIDSTACK_QUIET=1``, so ``accelerate launch`` workers obey it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

QUIET_ENV = "HYBRIDSTACK_QUIET"
FIRST_LINE_S = 30.0
EVERY_S = 60.0

log = logging.getLogger("hybridstack.progress")


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) progress in this process and in the processes it starts."""
    if quiet:
        os.environ[QUIET_ENV] = "1"
    else:
        os.environ.pop(QUIET_ENV, None)


def is_quiet() -> bool:
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


class LogLines:
    """A tqdm-shaped progress that writes a few log lines instead of redrawing a bar."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n = total, 0
        self.started = self.last_line = time.monotonic()
        self.lines = 0
        self.postfix = ""

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        due = FIRST_LINE_S if self.lines == 0 else EVERY_S
        if now - self.last_line >= due:
            self._line(now)

    def set_postfix(self, **values: object) -> None:
        """Shown in the next line, as a bar shows it after the count (e.g. the running loss)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.lines:  # only phases that already said they were running say they ended
            self._line(time.monotonic(), done=True)
            self.lines = 0

    def _line(self, now: float, done: bool = False) -> None:
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        state = "done" if done else "running"
        postfix = f", {self.postfix}" if self.postfix else ""
        log.info("%s: %s %s %s (%.0fs%s)", self.desc, state, count, self.unit,
                 now - self.started, postfix)
        self.last_line, self.lines = now, self.lines + 1


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str,
             unit: str = "it", disable: bool = False, leave: bool = False) -> Any:
    """``tqdm(iterable, ...)`` on a terminal, :class:`LogLines` elsewhere, a silent pass-through
    when ``disable`` (e.g. not the main process) or quiet. Use it as an iterable or as a
    context manager with ``update(n)``."""
    if disable or is_quiet():
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave)
    return LogLines(iterable, total, desc, unit)


class Timer:
    """``with Timer("tfidf: vocabulary") as t: ...``: a start line when the phase begins and
    an end line with the elapsed seconds (INFO, so quiet hides both)."""

    def __init__(self, what: str, logger: logging.Logger | None = None):
        self.what, self.log = what, logger or log
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        self.log.info("%s ...", self.what)
        self.started = time.perf_counter()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
        if exc_type is None:
            self.log.info("%s: %.1fs", self.what, self.seconds)
