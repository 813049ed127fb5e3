"""The streamed INT4 path end to end on a real shape (SmolLM2-135M's, random bf16 weights from
scripts/make_shapes.py): shards -> streamed RTN g64 -> onnxruntime-genai's graph -> ONNX Runtime prefill + one
decode step. About a minute on 2 cores. Random weights: only that it runs and the logits are finite is checked.
The 3B / 8B shapes are measured by scripts/streamed_int4.py (README, "Large models"), not here: minutes and
several GB each."""

from __future__ import annotations

import json

import pytest
from toys import load_script

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'compress[llm]')")


@pytest.mark.slow
def test_smollm2_shape_streamed_to_one_decode_step(tmp_path, capsys) -> None:
    load_script("make_shapes").write_shape("smollm2-135m", tmp_path / "hf", say=lambda _m: None)
    load_script("streamed_int4").main([str(tmp_path / "hf"), str(tmp_path / "work"), "--group-size", "64"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    heads = [line for line in lines if line.get("layer") == "head"]  # the head step's progress line
    layers = [line for line in lines if "layer" in line and line["layer"] != "head"]
    assert len(heads) == 1 and not heads[0]["reused"]
    summary = next(line["summary"] for line in lines if "summary" in line)
    assert [line["layer"] for line in layers] == list(range(30)) and not any(line["reused"] for line in layers)
    assert summary["ort"]["decode_step_ms"] > 0  # the decode step ran (non-finite logits raise)
    assert summary["build"]["gb"] < summary["source_gb"] / 2  # 4-bit weights, bf16 source
    assert summary["quantize"]["method"] == "vmhwm" and not (tmp_path / "work").exists()
