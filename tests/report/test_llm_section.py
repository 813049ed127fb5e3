"""The causal-lm part of report.html from hand-made evaluations: continuations, divergence mark, failure card."""

from __future__ import annotations

import numpy as np

from compress.families.base import Evaluation, ReportView
from compress.records import Comparison, RunManifest
from compress.report.html import Evidence, _llm


def _manifest() -> RunManifest:
    return RunManifest(
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


def test_continuations_mark_the_first_divergent_token_and_count_failures() -> None:
    base = Evaluation(
        {"ppl": 10.0}, np.zeros((2, 4)), {"greedy": [[1, 2, 3, 4], [5, 6, 7, 8]]}, {"window_nll": np.log([9.0, 11.0])}
    )
    int4 = Evaluation(
        {"ppl": 12.0}, np.zeros((2, 4)), {"greedy": [[1, 2, 9, 4], [5, 6]]}, {"window_nll": np.log([11.0, 13.0])}
    )
    view = ReportView(decode=lambda ids: [f"t{i} " for i in ids])
    out = "\n".join(_llm(_manifest(), Evidence(evaluations={"base": base, "int4": int4}, view=view)))
    assert out.count("<mark>") == 2 and "<mark>t9 </mark>" in out
    assert "t5 t6 <mark>[ends here]</mark>" in out  # the truncated one diverges where it ends
    assert "Perplexity per evaluation window" in out and "data:image/png;base64," in out
    # failure card row of int4: 2 prompts, no loop, not empty, 1 truncated (2 of 4 tokens), no bad bytes
    assert "<tr><td>int4</td><td>2</td><td>0</td><td>0</td><td>1</td><td>0</td></tr>" in out
