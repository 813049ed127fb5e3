"""`quantize: {precision: int4, method: rtn | gptq | awq, target: onnxruntime-genai, streamed: true}` through the
runner on the tiny Llama: each streamed artifact has the perplexity of its in-memory twin exactly (the same graph
from the same codes), its per-layer files are gone once it is complete, `activation_dtype: bfloat16` runs and
lands near float32's, and impossible combinations are refused at validate."""

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
  - quantize: {{{GPTQ}, streamed: true, name: gptq-streamed, input: source}}
  - quantize: {{{GPTQ}, streamed: true, activation_dtype: bfloat16, name: gptq-bf16, input: source}}"""


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
    bf16, f32 = rec["gptq-bf16"]["artifact"], rec["gptq-streamed"]["artifact"]
    assert bf16["info"]["activation_dtype"] == "bfloat16" and f32["info"]["activation_dtype"] == "float32"
    assert bf16["key"] != f32["key"]
    # other codes (tests/quant/test_streamed_awq.py measures how many), about the same model: the tiny model's
    # perplexity moved by 0.0002% (1229.832 vs 1229.830) in the run that set this bound
    assert ppl["gptq-bf16"] != ppl["gptq-streamed"] and abs(ppl["gptq-bf16"] / ppl["gptq-streamed"] - 1) < 0.01, ppl
    assert rec["streamed"]["memory"]["stage"]["peak_rss_mb"] > 0
    assert not list((tmp_path / "runs" / ".cache" / "streamed").glob("*/*"))  # per-layer files removed


AWQ = "precision: int4, method: {name: awq, then: gptq, samples: 4}, group_size: 32, target: onnxruntime-genai"
AWQ_STAGES = f"""
  - quantize: {{{AWQ}, name: awq-in-memory}}
  - quantize: {{{AWQ}, streamed: true, name: awq-streamed, input: source}}"""


def test_streamed_awq_stage_matches_in_memory_stage(tmp_path) -> None:
    pipeline = tiny_pipeline(tmp_path, "awq", AWQ_STAGES, data=DATA, gates="{ppl_rise_max: 50}", sharpen=4.0)
    assert main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"]) == EXIT_OK
    manifest = json.loads((tmp_path / "runs" / "awq" / "manifest.json").read_text())
    rec = {r["artifact"]["name"]: r for r in manifest["artifacts"]}
    ppl = {name: rec[name]["evaluation"]["metrics"]["ppl"] for name in rec if name != "source"}
    assert ppl["awq-streamed"] == ppl["awq-in-memory"], ppl  # identical codes and folded norms
    info, memory = rec["awq-streamed"]["artifact"]["info"], rec["awq-in-memory"]["artifact"]["info"]
    assert info["method"] == "awq" and info["then"] == "gptq" and info["streamed"] is True
    # grouped-query attention (2 kv heads of 4): v -> o left unscaled in both layers, as in memory
    assert info["awq_groups_unscaled"] == memory["awq_groups_unscaled"] and len(info["awq_groups_unscaled"]) == 2


G = "precision: int4, method: gptq, target: onnxruntime-genai"


@pytest.mark.parametrize(
    "stage,says",
    [
        (
            "{precision: int4, method: autoround, target: onnxruntime-genai, streamed: true}",
            "streamed takes rtn, gptq or awq",
        ),
        ("{precision: int4, method: rtn, streamed: true}", "streamed needs target: onnxruntime-genai"),
        (f"{{{G}, activation_dtype: bfloat16}}", "activation_dtype = 'bfloat16': for streamed: true only"),
        (
            "{precision: int4, method: rtn, target: onnxruntime-genai, streamed: true, activation_dtype: float16}",
            "streamed rtn keeps no activations",
        ),
        (f"{{{G}, streamed: true, activation_dtype: int8}}", "activation_dtype"),
    ],
)
def test_streamed_refusals(tmp_path, capsys, stage, says) -> None:
    pipeline = tiny_pipeline(tmp_path, "bad", f"\n  - quantize: {stage}", data=DATA)
    assert main(["validate", str(pipeline)]) == EXIT_CONFIG
    err = capsys.readouterr()
    assert says in err.out + err.err and "streamed" in err.out + err.err
