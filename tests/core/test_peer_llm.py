"""scripts/peer_llm.py: the method column names what ran (`auto` resolved from the artifact's info)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from toys import load_script


@pytest.fixture(scope="module")
def peer_llm():
    return load_script("peer_llm")


def art(precision: str, config: dict, info: dict) -> SimpleNamespace:
    return SimpleNamespace(precision=precision, config=config, info=info)


def test_auto_is_named_by_what_it_resolved_to(peer_llm) -> None:
    genai = {"name": "onnxruntime-genai"}
    got = peer_llm._our_method(
        art(
            "int8",
            {"method": {"name": "auto"}, "group_size": 32, "lm_head": "int8", "target": genai},
            {"method": "rtn"},
        )
    )
    assert got == "rtn 8 bit g32, lm_head int8; genai fused graph"


def test_awq_then_gptq_and_our_graph(peer_llm) -> None:
    cfg = {"method": {"name": "awq", "then": "gptq"}, "group_size": 128, "lm_head": "int8"}
    assert peer_llm._our_method(art("int4", cfg, {})) == "awq+gptq 4 bit g128, lm_head int8; our graph"
    assert peer_llm._our_method(art("int8", {"method": "weight-only"}, {})) == "weight-only 8 bit; our graph"
    assert peer_llm._our_method(art("fp32", {}, {})) == "our ONNX export, fp32"
