"""The decoding-presets section of report.md / report.html from hand-made evaluations."""

from __future__ import annotations

import numpy as np

from compress.families.base import Evaluation, ReportView
from compress.records import Comparison, RunManifest
from compress.report.html import Evidence, _llm
from compress.report.llm import preset_texts, presets_markdown
from compress.report.markdown import render

WORDS = {1: "a", 2: "|b", 3: "\n", 4: "c"}


def _decode(ids):
    return [WORDS[i] for i in ids]


def _ev(greedy, balanced, beam) -> Evaluation:
    runs = {
        "balanced": {"settings": {"do_sample": True, "temperature": 0.7, "seed": 0}, "tokens": balanced},
        "beam": {"settings": {"num_beams": 4}, "tokens": beam},
    }
    outputs = {"greedy": greedy, "presets": {"prompts": ["p0", "p1"], "runs": runs}}
    return Evaluation({"ppl": 10.0}, np.zeros((1, 2)), outputs, {"window_nll": np.log([9.0])})


EVALS = {
    "base": _ev([[1, 1], [4]], [[2, 3, 4], [1]], [[4], [4, 4]]),
    "int8": _ev([[1, 4], [4]], [[1], []], [[4], [4, 1]]),
}


def test_preset_texts_side_by_side_per_prompt() -> None:
    view = preset_texts({n: e.outputs for n, e in EVALS.items()}, _decode)
    assert view.prompts == ["p0", "p1"] and list(view.settings) == ["greedy", "balanced", "beam"]
    assert view.texts[0]["base"] == {"greedy": "aa", "balanced": "|b\nc", "beam": "c"}
    assert view.texts[1]["int8"] == {"greedy": "c", "balanced": "", "beam": "ca"}
    md = "\n".join(presets_markdown(view))
    assert "- `balanced`: do_sample True, temperature 0.7, seed 0" in md and "- `greedy`: greedy" in md
    assert "| base | aa | \\|b⏎ c | c |" in md  # a pipe is escaped, a newline shown, the row stays one line
    assert "| int8 | c | (empty) | ca |" in md
    assert preset_texts({"base": {"greedy": [[1]]}}, _decode) is None  # no presets recorded: no section


def test_reports_include_the_section_only_with_presets() -> None:
    manifest = RunManifest(
        compress_version="0",
        created="now",
        pipeline={"name": "lm", "file": "lm.yaml", "family": "causal-lm"},
        baseline="base",
        metric_names=("ppl",),
        comparisons=(Comparison("ppl_rise_pct", "ppl rise %", 1),),
        artifacts=(),
        gates=(),
        verdict="PASS",
    )
    evidence = Evidence(evaluations=EVALS, view=ReportView(decode=_decode))
    assert "## Decoding presets on the fixed prompts" in render(manifest, evidence)
    assert "Decoding presets" not in render(manifest)
    html = "".join(_llm(manifest, evidence))
    assert "<h2>Decoding presets on the fixed prompts</h2>" in html and "<pre>|b\nc</pre>" in html
