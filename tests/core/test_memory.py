"""Per-stage peak RSS (compress/memory.py): each method sees an allocation made inside its body, and the
runner writes the stage's and the evaluation's peaks into manifest.json and the report's stage table."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
from toys import pipeline_yaml

from compress import registry
from compress.config import load_pipeline
from compress.memory import PeakRss
from compress.progress import Reporter
from compress.runner import Runner

MB = 2**20
N_MB = 160  # well above the noise of a Python process's RSS (a few MB)
AUTO = ("vmhwm", "sampling")  # what PeakRss picks on Linux: sampling where /proc/self/clear_refs is refused


def _allocate(n_mb: int, hold_s: float = 0.05) -> None:
    buf = np.ones(n_mb * MB // 8)  # np.ones writes every page, so all of it is resident
    time.sleep(hold_s)  # the sampling thread samples every 5 ms
    del buf


@pytest.mark.parametrize("method", [None, "sampling"])
def test_peak_covers_an_allocation_inside_the_body(method) -> None:
    with PeakRss(force_method=method) as peak:
        _allocate(N_MB)
    rec = peak.result
    assert (rec.method == method) if method else (rec.method in AUTO)  # vmhwm wherever clear_refs may be written
    # the buffer was resident at once: the peak rose by at least its size (1 MB of slack for page rounding)
    assert rec.peak_rss_mb - rec.start_rss_mb >= N_MB - 1


def test_high_water_mark_is_reset_between_measurements() -> None:
    with PeakRss() as first:
        _allocate(N_MB)
    with PeakRss() as second:
        pass
    assert first.result.peak_rss_mb - first.result.start_rss_mb >= N_MB - 1
    assert second.result.peak_rss_mb - second.result.start_rss_mb < N_MB / 4  # the first peak is not carried over


def test_ru_maxrss_fallback_is_an_upper_bound() -> None:
    with PeakRss(force_method="ru_maxrss") as peak:
        _allocate(N_MB)
    assert peak.result.method == "ru_maxrss" and peak.result.peak_rss_mb >= N_MB


def _stage_row(report, name: str) -> str:
    table = report.read_text().split("## Stages: time and memory", 1)[1]
    return next(line for line in table.splitlines() if line.startswith(f"| {name} |"))


def test_runner_records_stage_and_evaluation_peaks(tmp_path, fashion_mnist, monkeypatch) -> None:
    real = registry._STAGES["finetune"].run

    def fat_finetune(artifact, options, ctx):
        _allocate(N_MB)
        return real(artifact, options, ctx)

    monkeypatch.setitem(
        registry._STAGES, "finetune", dataclasses.replace(registry._STAGES["finetune"], run=fat_finetune)
    )
    pipeline = pipeline_yaml(tmp_path, fashion_mnist, name="mem", stages="\n  - finetune: {steps: 5, lr: 1.0e-2}")
    Runner(load_pipeline(pipeline), runs_dir=tmp_path / "runs", reporter=Reporter(quiet=True), bench=False).run()
    run_dir = tmp_path / "runs" / "mem"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    entries = {e["artifact"]["name"]: e for e in manifest["artifacts"]}
    stage = entries["finetune"]["memory"]["stage"]
    assert stage["method"] in AUTO
    assert stage["peak_rss_mb"] - stage["start_rss_mb"] >= N_MB - 1
    assert entries["finetune"]["memory"]["evaluation"]["peak_rss_mb"] > 0
    assert "stage" in entries["source"]["memory"]
    row = _stage_row(run_dir / "report.md", "finetune")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[3]) == pytest.approx(stage["peak_rss_mb"], abs=1) and cells[-1] in AUTO

    # a second run reuses everything: the table says cached instead of inventing a figure
    Runner(load_pipeline(pipeline), runs_dir=tmp_path / "runs", reporter=Reporter(quiet=True), bench=False).run()
    row = _stage_row(run_dir / "report.md", "finetune")
    assert "| cached | cached | cached |" in row
