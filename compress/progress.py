"""Progress bars and log lines for long work (training, calibration, evaluation, benchmarks).

The console shows our lines only: text we print that is not ours (paths, exception messages such as
`pip install 'compress[tensorrt]'`) is printed as it is, not read as rich markup, and the chatter of the
libraries we call (ONNX Runtime's calibrator prints, exporter and transformers warnings) is kept off it by
`quiet_third_party`, one call at a time.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

#: rich styles our own log lines use (`[green]cache hit[/]`); any other `[...]` in a message is text
_STYLE = r"(?:bold|dim|italic|red|green|yellow|cyan|blue|magenta)"
_OUR_TAG = re.compile(rf"\[/?(?:{_STYLE}(?: {_STYLE})*)?\]")


def as_markup(message: str) -> str:
    """`message` for rich: our style tags kept, everything else escaped (a path or an exception printed
    through an f-string stays as written)."""
    parts, last = [], 0
    for tag in _OUR_TAG.finditer(message):
        parts += [escape(message[last : tag.start()]), tag.group()]
        last = tag.end()
    return "".join([*parts, escape(message[last:])])


@contextmanager
def quiet_third_party() -> Iterator[None]:
    """Keep one library call's chatter off the console: its prints to stdout (ONNX Runtime's calibrator),
    its warnings (the exporter's TracerWarnings and constant-folding notes, transformers' FutureWarnings)
    and its log records below ERROR. Errors still show. Root logging is restored afterwards, because
    ONNX Runtime's `matmul_nbits_quantizer` runs `logging.basicConfig(level=INFO)` at import."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            root.setLevel(logging.ERROR)
            yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


class Task:
    def __init__(self, progress: Progress | None, task_id: int | None) -> None:
        self._progress, self._id = progress, task_id

    def advance(self, n: float = 1, info: str | None = None) -> None:
        if self._progress is not None and self._id is not None:
            self._progress.update(self._id, advance=n, **({"info": escape(info)} if info is not None else {}))


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
                as_markup(f"  {self._description}: {self._done:g}{of} after {now - self._start:.0f} s {info or ''}")
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
        """Print a line (and into the run's log file); only our style tags are markup (see `as_markup`)."""
        self.console.print(as_markup(message))
        if self.file is not None:
            self.file.print(as_markup(message), soft_wrap=True)

    @contextmanager
    def task(self, description: str, total: float | None) -> Iterator[Task]:
        if self.quiet or not sys.stderr.isatty() and not self.console.is_terminal:
            # No terminal (CI, logs): one line at the start and one at the end instead of a redrawn bar.
            self.console.print(as_markup(f"  {description} ..."))
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
            task_id = progress.add_task(as_markup(description), total=total, info="")
            yield Task(progress, task_id)
