"""Peak resident memory of one piece of work (a stage, an evaluation), for manifest.json and the report.

    with PeakRss() as peak:
        run_stage()
    peak.result.to_json()  # {"peak_rss_mb": 812.4, "start_rss_mb": 301.0, "method": "vmhwm", ...}

Why three methods: Linux keeps a resettable high-water mark (`echo 5 > /proc/self/clear_refs` resets VmHWM to
the current RSS, proc(5)), which is exact and free; where that write is refused (some containers, non-Linux) a
thread samples the current RSS every few milliseconds (a short spike between samples can be missed, so it is a
lower bound); and where neither /proc file exists `ru_maxrss` is the peak of the whole process since it
started (an upper bound for this piece of work). The method used is recorded beside the figure.

Memory of child processes is not in this process's RSS and is not measured here (a forked child's ru_maxrss
starts from its parent's RSS at the fork, so it would say nothing about the child): compress runs stages and
evaluations in-process, and the benchmark worker measures itself.
"""

from __future__ import annotations

import resource
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

Method = Literal["vmhwm", "sampling", "ru_maxrss"]
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_SAMPLE_SECONDS = 0.005


@dataclass(frozen=True)
class PeakRecord:
    """Peak RSS of one piece of work, in MiB, and how it was measured (see the module docstring)."""

    peak_rss_mb: float
    start_rss_mb: float
    method: Method

    def to_json(self) -> dict[str, Any]:
        return {
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "start_rss_mb": round(self.start_rss_mb, 1),
            "method": self.method,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PeakRecord:
        return cls(
            peak_rss_mb=float(data["peak_rss_mb"]),
            start_rss_mb=float(data["start_rss_mb"]),
            method=data["method"],
        )


def _status_mb(field: str) -> float | None:
    """`VmRSS` / `VmHWM` of this process from /proc/self/status, in MiB (None where there is no such file)."""
    try:
        with _STATUS.open() as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def current_rss_mb() -> float:
    """This process's resident set now, in MiB (VmRSS; 0.0 where /proc is missing)."""
    return _status_mb("VmRSS") or 0.0


def high_water_mb() -> float:
    """This process's resident high-water mark now, in MiB: VmHWM (since its last reset by `PeakRss`), else
    `ru_maxrss` (since the process started)."""
    return _status_mb("VmHWM") or _ru_maxrss_mb(resource.RUSAGE_SELF)


def _ru_maxrss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel or the sandbox refuses."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    hwm, rss = _status_mb("VmHWM"), _status_mb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1.0  # it really was reset


class PeakRss:
    """Context manager measuring the peak RSS of its body; `result` is set on exit (also on an exception).

    One measurement at a time per process: the high-water mark is process-wide, so nested use would reset
    the outer one (the runner measures stages and evaluations one after the other, never nested).
    """

    def __init__(self, *, force_method: Method | None = None) -> None:
        self.force_method = force_method  # for tests of the fallbacks
        self.result: PeakRecord | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled = 0.0

    def __enter__(self) -> PeakRss:
        self._start = _status_mb("VmRSS")
        method = self.force_method
        if method in (None, "vmhwm"):
            if self._start is not None and _reset_high_water_mark():
                method = "vmhwm"
            elif method == "vmhwm":
                raise OSError("/proc/self/clear_refs: the high-water mark cannot be reset here")
            else:
                method = "sampling" if self._start is not None else "ru_maxrss"
        self.method: Method = method
        if method == "sampling":
            self._sampled = self._start or 0.0
            self._thread = threading.Thread(target=self._sample, name="peak-rss-sampler", daemon=True)
            self._thread.start()
        if self._start is None:  # no /proc: the process's peak so far stands for the start
            self._start = _ru_maxrss_mb(resource.RUSAGE_SELF)
        return self

    def _sample(self) -> None:
        while not self._stop.wait(_SAMPLE_SECONDS):
            rss = _status_mb("VmRSS")
            if rss is not None and rss > self._sampled:
                self._sampled = rss

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.method == "vmhwm":
            peak = _status_mb("VmHWM") or 0.0
        elif self.method == "sampling":
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            peak = max(self._sampled, _status_mb("VmRSS") or 0.0)
        else:
            peak = _ru_maxrss_mb(resource.RUSAGE_SELF)
        self.result = PeakRecord(peak_rss_mb=peak, start_rss_mb=self._start or 0.0, method=self.method)
