"""`quantize: {precision: int4, method: rtn | gptq, target: onnxruntime-genai, streamed: true}` through the runner
on the tiny Llama: each streamed artifact has the perplexity of its in-memory twin exactly (the same graph from
the same codes), its per-layer files are gone once it is complete, and impossible combinations are refused at
validate."""

from __future__ import annotations

import json

import pytest
from llm_toys import tiny_pipeline

from compress.cli import EXIT_CONFIG, EXIT_OK, main

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'compress[llm]')")

DATA = '{window: 64, evaluation_windows: 4, calibration_windows: 4, generation_tokens: 4, prompts: ["def"]}'
RTN = "precision: int4, method: rtn, group_size: 32, lm_head: int4, target: onnxruntime-genai"
GPTQ = "precision: int4, method: {name: gptq, samples: 4}, group_size: 32, target: onnxruntime-genai"
STAGES = f"""
  - quantize: {{{RTN}, name: in-memory}}
  - quantize: {{{RTN}, streamed: true, name: streamed, input: source}}
  - quantize: {{{GPTQ}, name: gptq-in-memory, input: source}}
  - quantize: {{{GPTQ}, streamed: true, name: gptq-streamed, input: source}}"""


def test_streamed_stage_matches_in_memory_stage(tmp_path) -> None:
    pipeline = tiny_pipeline(tmp_path, "streamed", STAGES, data=DATA, gates="{ppl_rise_max: 50}", sharpen=4.0)
    assert main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"]) == EXIT_OK
    manifest = json.loads((tmp_path / "runs" / "streamed" / "manifest.json").read_text())
    rec = {r["artifact"]["name"]: r for r in manifest["artifacts"]}
    info = rec["streamed"]["artifact"]["info"]
    assert info["streamed"] is True and info["layers_streamed"] == 2 and info["layers_reused"] == 0
    ppl = {name: rec[name]["evaluation"]["metrics"]["ppl"] for name in rec if name != "source"}
    assert ppl["streamed"] == ppl["in-memory"], ppl  # identical graphs: no tolerance
    assert ppl["gptq-streamed"] == ppl["gptq-in-memory"], ppl  # identical codes (tests/quant/test_streamed.py)
    assert rec["gptq-streamed"]["artifact"]["info"]["method"] == "gptq"
    assert rec["streamed"]["memory"]["stage"]["peak_rss_mb"] > 0
    assert not list((tmp_path / "runs" / ".cache" / "streamed").glob("*/*"))  # per-layer files removed


@pytest.mark.parametrize(
    "stage,says",
    [
        ("{precision: int4, method: awq, target: onnxruntime-genai, streamed: true}", "streamed takes rtn or gptq"),
        ("{precision: int4, method: rtn, streamed: true}", "streamed needs target: onnxruntime-genai"),
    ],
)
def test_streamed_refusals(tmp_path, capsys, stage, says) -> None:
    pipeline = tiny_pipeline(tmp_path, "bad", f"\n  - quantize: {stage}", data=DATA)
    assert main(["validate", str(pipeline)]) == EXIT_CONFIG
    err = capsys.readouterr()
    assert says in err.out + err.err and "streamed" in err.out + err.err
