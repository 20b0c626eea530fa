"""One progress helper for every long loop: a rich bar on a terminal, plain lines in a log file.

On a terminal (or in a notebook) :func:`progress_bar` draws a rich bar with
the rate and the time left. When stderr goes to a file or a pipe (a batch job,
``nohup``, CI) a redrawn bar would reach the log once, at the end, so instead
it prints a line such as ``extracting mobilenet_v2: 1200/10015 (12%) 63.1
images/s, 0:00:19 elapsed, eta 0:02:20`` at every 10 % step and at least every
:data:`SECONDS_ENV` seconds (5 by default) while there is progress, and a
final line, as tqdm does in batch jobs.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from embedstore.errors import ConfigError

_console = Console(stderr=True)

#: Environment variable: seconds between two progress lines in a log file (default 5; 0 prints every step).
SECONDS_ENV = "EMBEDSTORE_PROGRESS_SECONDS"
DEFAULT_SECONDS = 5.0

#: ``advance(n=1, message=None)``: ``n`` more items done; ``message``, when given, replaces the description shown.
Advance = Callable[..., None]


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True, unit: str = "images") -> Iterator[Advance]:
    """Yield ``advance(n=1, message=None)`` for a loop of ``total`` items.

    Nothing is shown when ``enabled`` is false or there is no work; a rich bar on
    a terminal or in a notebook; plain lines (see the module's docstring) otherwise.
    """
    if not enabled or total <= 0:
        yield lambda n=1, message=None: None
    elif _console.is_terminal or _console.is_jupyter:
        with _rich_bar(description, total, unit) as advance:
            yield advance
    else:
        log = LogLines(description, total, unit, line_interval())
        try:
            yield log.advance
        finally:
            log.finish()


def note(message: str) -> None:
    """A line that stays (on stderr, above a bar that is drawn): an event worth keeping, such as a tuned result."""
    _console.print(message, highlight=False, markup=False, soft_wrap=True)


@contextmanager
def _rich_bar(description: str, total: int, unit: str) -> Iterator[Advance]:
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
    )
    with Progress(*columns, console=_console, transient=False) as bar:
        task = bar.add_task(description, total=total, rate="")

        def advance(n: int = 1, message: str | None = None) -> None:
            bar.update(task, advance=n, **({} if message is None else {"description": message}))
            speed = bar.tasks[task].speed
            if speed:
                bar.update(task, rate=f"{speed:,.1f} {unit}/s")

        yield advance


def line_interval() -> float:
    """Seconds between two progress lines in a log file: :data:`SECONDS_ENV`, or 5."""
    raw = os.environ.get(SECONDS_ENV, "").strip()
    if not raw:
        return DEFAULT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses nan
        raise ConfigError(f"{SECONDS_ENV} must be a number of seconds (0 or more), not {raw!r}")
    return seconds


class LogLines:
    """Progress as plain lines on stderr: at every 10 % step, at least every ``interval`` seconds, and at the end."""

    def __init__(self, description: str, total: int, unit: str, interval: float) -> None:
        self.description, self.total, self.unit, self.interval = description, total, unit, interval
        self.done = 0
        self.start = self.last_time = time.monotonic()
        self.last_done, self.last_description = 0, description  # what the last line printed said

    def advance(self, n: int = 1, message: str | None = None) -> None:
        self.done += n
        if message is not None:
            self.description = message
        now = time.monotonic()
        step = 10 * self.done // self.total > 10 * self.last_done // self.total
        news = n or message is not None
        if news and (step or now - self.last_time >= self.interval):
            self._print(now)

    def finish(self) -> None:
        """The final line: where the loop ended (unless the last line already said so)."""
        if (self.done, self.description) != (self.last_done, self.last_description):
            self._print(time.monotonic())

    def line(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = f", eta {_clock((self.total - self.done) / rate)}" if rate and self.done < self.total else ""
        return (f"{self.description}: {self.done}/{self.total} ({100 * self.done // self.total}%) "
                f"{rate:,.1f} {self.unit}/s, {_clock(elapsed)} elapsed{left}")

    def _print(self, now: float) -> None:
        print(self.line(now), file=sys.stderr, flush=True)
        self.last_time, self.last_done, self.last_description = now, self.done, self.description


def _clock(seconds: float) -> str:
    """``h:mm:ss``, as rich and tqdm show times."""
    return str(timedelta(seconds=int(seconds)))
