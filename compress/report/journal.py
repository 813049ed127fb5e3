"""What a run folder says while a run is under way, and after one crashed: never an earlier run's verdict.

At the start of a run `report.md` says "run in progress — no verdict" and `manifest.json` loses its verdict
and gates; a crash or Ctrl-C replaces that by what failed where. Only a finished run writes a verdict.
`run.log` keeps every run's log lines (appended, one header per run) and the traceback of a crash.
"""

from __future__ import annotations

import json
import os
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from compress import __version__
from compress.atomic import write_json_atomic
from compress.paths import LOG_FILE, MANIFEST_FILE, REPORT_FILE
from compress.progress import Reporter
from compress.report.markdown import render_unfinished, write_text_atomic


class RunJournal:
    """Opened once the run folder is ours (`start`), told of a crash (`failed`), then `close`d."""

    def __init__(self, run_dir: Path, name: str, pipeline_file: Path, reporter: Reporter) -> None:
        self.run_dir, self.name, self.pipeline_file, self.reporter = run_dir, name, str(pipeline_file), reporter
        self.log_path = run_dir / LOG_FILE
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._log: TextIO | None = None
        self.traceback_in: Path | None = None  # run.log once a crash's traceback is written there

    def start(self) -> None:
        self._log = self.log_path.open("a", encoding="utf-8")
        self._log.write(
            f"\n===== compress run {self.pipeline_file}, started {self.started} "
            f"(compress {__version__}, pid {os.getpid()}) =====\n"
        )
        self.reporter.log_to(self._log)
        self._withdraw("running")

    def failed(self, exc: BaseException, step: str) -> None:
        """Record a crash or interrupt during `step`: traceback in run.log, report.md and manifest say so."""
        if self._log is None:
            return  # the run never took the folder (e.g. it is locked): leave it as it is
        state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        error = "".join(traceback.format_exception_only(exc)).strip()
        try:
            self._log.write(f"----- {state} during {step} -----\n")
            self._log.write("".join(traceback.format_exception(exc)))
            self._log.flush()
            self.traceback_in = self.log_path
            self._withdraw(state, step=step, error=error)
        except OSError:
            pass  # a full disk must not hide the error being reported

    def close(self) -> None:
        if self._log is not None:
            self.reporter.log_to(None)
            self._log.close()
            self._log = None

    def _withdraw(self, state: str, step: str | None = None, error: str | None = None) -> None:
        text = render_unfinished(self.name, self.pipeline_file, self.started, state, step=step, error=error)
        write_text_atomic(self.run_dir / REPORT_FILE, text)
        path = self.run_dir / MANIFEST_FILE
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return  # no earlier manifest: nothing to withdraw
        manifest.update(verdict=None, passed=False, gates=[], run={"state": state, "step": step, "error": error})
        write_json_atomic(path, manifest)
