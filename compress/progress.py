"""Progress bars and log lines for long work (training, calibration, evaluation, benchmarks)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Task:
    def __init__(self, progress: Progress | None, task_id: int | None) -> None:
        self._progress, self._id = progress, task_id

    def advance(self, n: float = 1, info: str | None = None) -> None:
        if self._progress is not None and self._id is not None:
            self._progress.update(self._id, advance=n, **({"info": info} if info is not None else {}))


class LogTask(Task):
    """Without a terminal: a log line every `every` seconds instead of a redrawn bar."""

    def __init__(self, console: Console, description: str, total: float | None, every: float = 30.0) -> None:
        super().__init__(None, None)
        self._console, self._description, self._total, self._every = console, description, total, every
        self._done, self._start = 0.0, time.monotonic()
        self._last = self._start

    def advance(self, n: float = 1, info: str | None = None) -> None:
        self._done += n
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            of = f"/{self._total:g}" if self._total else ""
            self._console.print(
                f"  {self._description}: {self._done:g}{of} after {now - self._start:.0f} s {info or ''}"
            )


class Reporter:
    """Writes to stderr; `quiet=True` (tests) keeps log lines but drops the bars."""

    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        if not self.console.is_terminal:
            self.console.width = 160  # logs: do not wrap at 80 columns
        self.quiet = quiet
        self.file: Console | None = None

    def log_to(self, file: TextIO | None) -> None:
        """Also write every log line, as plain text, to `file` (the run's `run.log`); None stops it."""
        self.file = None if file is None else Console(file=file, no_color=True, highlight=False, width=160)

    def log(self, message: str) -> None:
        self.console.print(message)
        if self.file is not None:
            self.file.print(message, soft_wrap=True)

    @contextmanager
    def task(self, description: str, total: float | None) -> Iterator[Task]:
        if self.quiet or not sys.stderr.isatty() and not self.console.is_terminal:
            # No terminal (CI, logs): one line at the start and one at the end instead of a redrawn bar.
            self.console.print(f"  {description} ...")
            yield LogTask(self.console, description, total) if not self.quiet else Task(None, None)
            return
        columns = [
            TextColumn("  {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task_id = progress.add_task(description, total=total, info="")
            yield Task(progress, task_id)
