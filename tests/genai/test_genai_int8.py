"""Our 8-bit weights through onnxruntime-genai's builder on the tiny Llama: codes unchanged, the tied table once.

Every MatMulNBits of the built graph is unpacked with our own reader and compared with our RTN codes (the
scales rounded to fp16, the AutoGPTQ layout's type); the file's bytes are accounted from the model's
shapes; the logits are compared with torch running exactly those weights, at float compute (level 0).
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
import torch
from llm_toys import VOCAB, tiny_llama, tiny_pipeline
from test_genai_build import (
    EVERY_LINEAR,
    HIDDEN,
    _expected_nodes,
    _graph,
    _nbits_weights,
    _ort_logits,
    _ours_fp16_scales,
    _save,
    _torch_logits,
)

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'compress[llm]')")

from compress.cli import EXIT_CONFIG, EXIT_OK, main  # noqa: E402
from compress.genai.build import build_fused_decoder  # noqa: E402
from compress.quant.algorithms.rtn import rtn_quantize_model  # noqa: E402
from compress.quant.primitives.weight import WeightQuantConfig  # noqa: E402

GROUP = 32


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("genai8") / "hf-tied", tie=True)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("genai8") / "hf-untied", tie=False)


def _rtn8(tie: bool, symmetric: bool):
    model = tiny_llama(tie=tie)
    config = WeightQuantConfig(bits=8, group_size=GROUP, symmetric=symmetric)
    return model, rtn_quantize_model(model, config=config, layers_filter=EVERY_LINEAR)


def _with_fp16_scales(model: torch.nn.Module, qws) -> torch.nn.Module:
    """The torch model holding exactly the graph's weights (our codes, fp16-rounded scales)."""
    with torch.no_grad():
        for name, qw in qws.items():
            model.get_submodule(name).weight.copy_(_ours_fp16_scales(qw))
    return model


def _data_bytes(out) -> int:
    return sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_int8_fused_graph_is_our_8bit_weights_and_stores_the_table_once(tied, tmp_path, symmetric):
    folder, _ = tied
    model, qws = _rtn8(tie=True, symmetric=symmetric)
    out = build_fused_decoder(
        folder, tmp_path / "int8", precision="int8", quantized=qws, lm_head="int8", accuracy_level=0
    )
    graph = _graph(out)
    ops = collections.Counter(n.op_type for n in graph.graph.node)
    assert ops["GroupQueryAttention"] == 2 and ops["GatherBlockQuantized"] == 1
    assert {a.name: a.i for n in graph.graph.node if n.op_type == "GatherBlockQuantized" for a in n.attribute}[
        "bits"
    ] == 8
    got, expected = _nbits_weights(graph), _expected_nodes(qws)
    assert set(got) == set(expected)
    assert all({a.name: a.i for a in n.attribute}["bits"] == 8 for n in graph.graph.node if n.op_type == "MatMulNBits")
    for name, w in expected.items():
        assert torch.equal(got[name], w), name  # the builder re-quantizes with our scales: the same codes
    floats = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and VOCAB in t.dims]
    assert floats == []  # no float table: the gather reads the lm_head's 8-bit codes
    # bytes: 1 a weight + per group an fp32 scale (the builder widens fp16 to the graph's io type) and a
    # uint8 zero point (it always writes them), + the float norms and GroupQueryAttention's fp32 rotary
    # cos/sin caches (max positions x head/2 each); the graph's structure a few KB
    weights = sum(qw.qweight.numel() for qw in qws.values())
    groups = sum(qw.scales.numel() for qw in qws.values())
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    cfg = model.config
    rotary = 2 * cfg.max_position_embeddings * (cfg.hidden_size // cfg.num_attention_heads // 2)
    expected_bytes = weights + 5 * groups + 4 * (norms + rotary)
    assert expected_bytes <= _data_bytes(out) <= expected_bytes + 24_000, (_data_bytes(out), expected_bytes)
    # same weights, float compute: fused kernels sum in another order (measured ~1e-6 on logits of ~1.4)
    np.testing.assert_allclose(_ort_logits(out), _torch_logits(_with_fp16_scales(model, qws)), atol=1e-4, rtol=0)


def test_untied_int8_keeps_its_own_float_embedding(untied, tmp_path):
    folder, _ = untied
    model, qws = _rtn8(tie=False, symmetric=True)
    out = build_fused_decoder(
        folder, tmp_path / "int8", precision="int8", quantized=qws, lm_head="int8", accuracy_level=0
    )
    graph = _graph(out)
    inits = graph.graph.initializer
    floats = [list(t.dims) for t in inits if t.data_type == onnx.TensorProto.FLOAT and VOCAB in t.dims]
    assert floats == [[VOCAB, HIDDEN]]  # the embedding's own table; the lm_head is 8-bit
    assert "GatherBlockQuantized" not in {n.op_type for n in graph.graph.node}
    np.testing.assert_allclose(_ort_logits(out), _torch_logits(_with_fp16_scales(model, qws)), atol=1e-4, rtol=0)


def test_int8_needs_our_8bit_lm_head(tied, tmp_path):
    folder, _ = tied
    _, qws = _rtn8(tie=True, symmetric=True)
    body = {k: v for k, v in qws.items() if k != "lm_head"}
    with pytest.raises(ValueError, match="lm_head included"):
        build_fused_decoder(folder, tmp_path / "a", precision="int8", quantized=body, lm_head="int8")
    with pytest.raises(ValueError, match="not 4-bit"):
        build_fused_decoder(folder, tmp_path / "b", precision="int4", quantized=qws)
    assert list(tmp_path.iterdir()) == []


DATA = '{window: 64, evaluation_windows: 2, calibration_windows: 2, generation_tokens: 4, prompts: ["The for"]}'


def test_int8_genai_stage_through_the_runner(tmp_path):
    stages = """
  - quantize: {precision: int8, target: onnxruntime-genai, group_size: 32, name: genai-int8}"""
    pipeline = tiny_pipeline(tmp_path, "int8genai", stages, data=DATA)
    code = main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"])
    assert code == EXIT_OK
    manifest = json.loads((tmp_path / "runs" / "int8genai" / "manifest.json").read_text())
    art = {r["artifact"]["name"]: r for r in manifest["artifacts"]}["genai-int8"]["artifact"]
    assert art["precision"] == "int8" and art["target"] == "onnxruntime-genai"
    assert art["info"]["fused_ops"]["GatherBlockQuantized"] == 1
    assert art["info"]["embedding"].startswith("tied")
    assert art["info"]["parity_max_abs_diff"] < 0.1  # accuracy level 4 (int8 activations): ~1e-2 seen


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ("\n  - export: {opset: 17}\n  - quantize: {precision: int8, target: onnxruntime-genai}", "starts from torch"),
        ("\n  - quantize: {precision: int8, target: onnxruntime-genai, lm_head: float}", "lm_head"),
        ("\n  - quantize: {precision: int8, target: onnxruntime-genai, method: dynamic}", "weight-only"),
    ],
    ids=["after-export", "float-head", "dynamic"],
)
def test_int8_genai_refusals(tmp_path, capsys, stages, message):
    pipeline = tiny_pipeline(tmp_path, "refused8", stages, data=DATA)
    assert main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"]) == EXIT_CONFIG
    assert message in capsys.readouterr().err
