"""A tiny causal-lm `compress run` end to end: the decode prompt-length sweep behind the report's plot, and a
console that shows compress's own lines only."""

from __future__ import annotations

import json
import re

from compress.records import RunManifest
from compress.report.markdown import decode_sweep

SWEEP = (8, 32, 128)  # the pipeline's two lengths and the 128-token context decode is always timed at

# every line compress writes during `compress run` without a terminal (progress.Reporter and the runner)
OWN_LINE = re.compile(
    r"compress run \S+ -> \S+"
    r"|(?:load|run|cached|reuse) {2,}\S.*"  # the runner's stage lines
    r"|data: .*|(?:PASS|FAIL|NOT CHECKED) .*"
    r"| {2}\S.*"  # log lines of stages, evaluation and benchmarks, and `<task> ...` progress starts
    r"| {11}\S.*"  # results under a stage or benchmark
)


def test_decode_sweep_has_one_row_per_prompt_length(llm_run) -> None:
    assert llm_run.code == 0, llm_run.stderr
    raw = json.loads((llm_run.run_dir / "manifest.json").read_text())
    sweep = decode_sweep(RunManifest.from_json(raw))
    assert set(sweep) == {"source", "gptq", "awq"}
    for name, row in sweep.items():
        assert tuple(row) == SWEEP, name
        assert all(v > 0 for v in row.values()), (name, row)
    # the 128-token point is the batch-1 decode the benchmark measures anyway (no second measurement)
    llm = next(r for r in raw["artifacts"] if r["artifact"]["name"] == "gptq")["bench"]["llm"]
    assert sweep["gptq"][128] == llm["decode_tokens_per_s"]["1"]
    report = (llm_run.run_dir / "report.md").read_text()
    assert "| decode tok/s after 8 | decode tok/s after 32 | decode tok/s after 128 |" in report
    page = (llm_run.run_dir / "report.html").read_text()
    assert "Decode speed vs prompt length" in page and "<th>decode tok/s after 32</th>" in page
    assert "<th>decode step b1 ms</th>" in page  # the causal-lm speed table, as in report.md


def test_console_shows_only_compress_lines(llm_run) -> None:
    assert llm_run.code == 0, llm_run.stderr
    assert llm_run.stdout == ""  # `compress run` logs to stderr; stdout stays free for pipes
    # a warning's source line is indented like ours, so warnings and bars are also looked for by their words
    foreign = [
        line
        for line in llm_run.stderr.splitlines()
        if not OWN_LINE.fullmatch(line) or re.search(r"Warning|warn\(|it/s\]|\d+%\|", line)
    ]
    assert foreign == [], "\n".join(foreign)
    for task in ("quantize int4 gptq g32 ...", "evaluate awq (perplexity) ...", "benchmark gptq (batch [1, 2]"):
        assert f"  {task}" in llm_run.stderr
