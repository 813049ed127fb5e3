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
from onnx import numpy_helper
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

import compress.genai.build as genai_build  # noqa: E402
from compress.cli import EXIT_CONFIG, EXIT_OK, main  # noqa: E402
from compress.errors import StageError  # noqa: E402
from compress.genai.build import build_fused_decoder  # noqa: E402
from compress.genai.rewrite import drop_default_zero_points  # noqa: E402
from compress.quant.algorithms.rtn import rtn_quantize_model  # noqa: E402
from compress.quant.primitives.weight import WeightQuantConfig  # noqa: E402
from compress.stages.quantize.int8_genai import unit_group_sizes  # noqa: E402

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


def _initializer_bytes(graph: onnx.ModelProto) -> dict[str, int]:
    return {t.name: numpy_helper.to_array(t).nbytes for t in graph.graph.initializer}


def _weight_bytes(model: torch.nn.Module, qws) -> int:
    """Codes (1 byte a weight), fp32 scales, fp32 norms and rotary caches: a symmetric 8-bit file's tensors."""
    weights = sum(qw.qweight.numel() for qw in qws.values())
    groups = sum(qw.scales.numel() for qw in qws.values())
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    cfg = model.config
    rotary = 2 * cfg.max_position_embeddings * (cfg.hidden_size // cfg.num_attention_heads // 2)
    return weights + 4 * (groups + norms + rotary)


def _zero_point_inputs(graph: onnx.ModelProto) -> list[str]:
    kinds = ("MatMulNBits", "GatherBlockQuantized")
    return [n.input[3] for n in graph.graph.node if n.op_type in kinds and len(n.input) > 3 and n.input[3]]


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
    # bytes: 1 a weight + per group an fp32 scale (the builder widens fp16 to the graph's io type) and, for
    # asymmetric weights only, a uint8 zero point, + the float norms and GroupQueryAttention's fp32 rotary
    # cos/sin caches (max positions x head/2 each); the graph's structure a few KB
    groups = sum(qw.scales.numel() for qw in qws.values())
    expected_bytes = _weight_bytes(model, qws) + (0 if symmetric else groups)
    assert expected_bytes <= _data_bytes(out) <= expected_bytes + 24_000, (_data_bytes(out), expected_bytes)
    # every tensor accounted: + the int64[2] shape of the gather's 2-D scales (and of its zero points)
    assert sum(_initializer_bytes(graph).values()) == expected_bytes + 16 * (1 if symmetric else 2)
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


@pytest.mark.parametrize("level", [0, None], ids=["level0", "level4"])
def test_default_zero_points_are_dropped_and_the_logits_stay_identical(tied, tmp_path, monkeypatch, level):
    """The builder writes a uint8 128 per block for symmetric weights; without them the logits are bit-identical."""
    folder, _ = tied
    model, qws = _rtn8(tie=True, symmetric=True)
    out = build_fused_decoder(
        folder, tmp_path / "drop", precision="int8", quantized=qws, lm_head="int8", accuracy_level=level
    )
    monkeypatch.setattr(genai_build, "drop_default_zero_points", lambda path: 0)
    kept = build_fused_decoder(
        folder, tmp_path / "kept", precision="int8", quantized=qws, lm_head="int8", accuracy_level=level
    )
    builder_zeros = _zero_point_inputs(with_zeros := _graph(kept))
    inits = {t.name: numpy_helper.to_array(t) for t in with_zeros.graph.initializer}
    assert len(builder_zeros) == 5 * 2 + 2  # qkv, o, gate, up, down of 2 layers, the lm_head and its gather
    assert all((inits[n.replace("/gather_2d", "")] == 128).all() for n in builder_zeros)
    assert _zero_point_inputs(_graph(out)) == []
    groups = sum(qw.scales.numel() for qw in qws.values())
    # one uint8 a group (the gather's Reshape of them and its int64[2] shape go too)
    assert sum(_initializer_bytes(with_zeros).values()) - sum(_initializer_bytes(_graph(out)).values()) == groups + 16
    assert np.array_equal(_ort_logits(out), _ort_logits(kept))
    assert drop_default_zero_points(kept / "model.onnx") == 11  # the lm_head's is shared with the gather
    assert np.array_equal(_ort_logits(kept), _ort_logits(out))


def test_real_zero_points_are_kept(tied, tmp_path):
    folder, _ = tied
    _, qws = _rtn8(tie=True, symmetric=False)
    out = build_fused_decoder(folder, tmp_path / "asym", precision="int8", quantized=qws, lm_head="int8")
    before = (out / "model.onnx.data").read_bytes()
    assert len(_zero_point_inputs(_graph(out))) == 12  # 11 MatMulNBits (packed qkv) + the tied gather
    assert drop_default_zero_points(out / "model.onnx") == 0
    assert (out / "model.onnx.data").read_bytes() == before


UNIT_GROUPS = {"mlp.down_proj": 128, "lm_head": 64}


def _rtn8_units(group_sizes: dict[str, int]):
    model = tiny_llama(tie=True)
    groups = unit_group_sizes(model, GROUP, group_sizes)
    overrides = {n: WeightQuantConfig(bits=8, group_size=g, symmetric=True) for n, g in groups.items() if g != GROUP}
    config = WeightQuantConfig(bits=8, group_size=GROUP, symmetric=True)  # as the stage
    return model, rtn_quantize_model(model, config=config, overrides=overrides, layers_filter=EVERY_LINEAR)


def test_per_unit_group_sizes_reach_each_node(tied, tmp_path):
    folder, _ = tied
    model, qws = _rtn8_units(UNIT_GROUPS)
    assert {n: qw.group_size for n, qw in qws.items() if qw.group_size != GROUP} == {
        "model.layers.0.mlp.down_proj": 128,
        "model.layers.1.mlp.down_proj": 128,
        "lm_head": 64,
    }
    out = build_fused_decoder(
        folder, tmp_path / "units", precision="int8", quantized=qws, lm_head="int8", accuracy_level=0
    )
    graph = _graph(out)
    blocks = {
        n.name: {a.name: a.i for a in n.attribute}["block_size"]
        for n in graph.graph.node
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
    }
    assert blocks.pop("/lm_head/MatMulNBits") == 64 and blocks.pop("/model/embed_tokens/GatherBlockQuantized") == 64
    assert {b for n, b in blocks.items() if "down_proj" in n} == {128}
    assert {b for n, b in blocks.items() if "down_proj" not in n} == {GROUP}
    got, expected = _nbits_weights(graph), _expected_nodes(qws)
    for name, w in expected.items():
        assert torch.equal(got[name], w), name
    assert _zero_point_inputs(graph) == []
    assert sum(_initializer_bytes(graph).values()) == _weight_bytes(model, qws) + 16  # the gather's scale shape
    np.testing.assert_allclose(_ort_logits(out), _torch_logits(_with_fp16_scales(model, qws)), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("group_size", "group_sizes", "message"),
    [
        (
            GROUP,
            {"self_attn.o_proj": 128},
            r"group_sizes\['self_attn.o_proj'\] = 128 does not divide "
            r"model.layers.0.self_attn.o_proj's in-features K = 64",
        ),
        (128, {}, "group_size = 128 does not divide model.layers.0.self_attn.q_proj's in-features K = 64"),
        (GROUP, {"mlp.nope": 64}, r"group_sizes \['mlp.nope'\] name no Linear of the model"),
        (GROUP, {"down_proj": 64, "mlp.down_proj": 128}, "all name model.layers.0.mlp.down_proj"),
    ],
    ids=["unit-K", "default-K", "unknown", "twice"],
)
def test_unit_groups_that_do_not_fit_are_refused(group_size, group_sizes, message):
    with pytest.raises(StageError, match=message):
        unit_group_sizes(tiny_llama(tie=True), group_size, group_sizes)


def test_packed_qkv_needs_one_group(tied, tmp_path):
    folder, _ = tied
    _, qws = _rtn8_units({"self_attn.q_proj": 64})
    with pytest.raises(ValueError, match="packs self_attn.q_proj, self_attn.k_proj, self_attn.v_proj into one"):
        build_fused_decoder(folder, tmp_path / "x", precision="int8", quantized=qws, lm_head="int8")
    assert list(tmp_path.iterdir()) == []


DATA = '{window: 64, evaluation_windows: 2, calibration_windows: 2, generation_tokens: 4, prompts: ["The for"]}'


def test_int8_genai_stage_through_the_runner(tmp_path):
    stages = """
  - quantize: {precision: int8, target: onnxruntime-genai, group_size: 32, name: genai-int8}
  - quantize: {precision: int8, target: onnxruntime-genai, group_sizes: {mlp.down_proj: 128}, name: genai-units,
               input: source}"""
    pipeline = tiny_pipeline(tmp_path, "int8genai", stages, data=DATA)
    code = main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"])
    assert code == EXIT_OK
    manifest = json.loads((tmp_path / "runs" / "int8genai" / "manifest.json").read_text())
    art = {r["artifact"]["name"]: r for r in manifest["artifacts"]}["genai-int8"]["artifact"]
    assert art["precision"] == "int8" and art["target"] == "onnxruntime-genai"
    assert art["info"]["fused_ops"]["GatherBlockQuantized"] == 1
    assert art["info"]["embedding"].startswith("tied")
    assert art["info"]["parity_max_abs_diff"] < 0.1  # accuracy level 4 (int8 activations): ~1e-2 seen
    assert art["info"]["zero_point_inputs"] == 0
    units = {r["artifact"]["name"]: r for r in manifest["artifacts"]}["genai-units"]["artifact"]
    assert units["info"]["group_sizes"] == {"mlp.down_proj": 128}
    folder = tmp_path / "runs" / "int8genai"
    sizes = [sum(_initializer_bytes(_graph(folder / a)).values()) for a in ("genai-int8", "genai-units")]
    assert sizes[0] - sizes[1] == 4 * 2 * 64 * (128 // 32 - 1)  # fp32 scales of 2 down_proj [64, K=128]


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ("\n  - export: {opset: 17}\n  - quantize: {precision: int8, target: onnxruntime-genai}", "starts from torch"),
        ("\n  - quantize: {precision: int8, target: onnxruntime-genai, lm_head: float}", "lm_head"),
        ("\n  - quantize: {precision: int8, target: onnxruntime-genai, method: dynamic}", "weight-only"),
        (
            "\n  - export: {opset: 17}\n  - quantize: {precision: int8, group_sizes: {mlp.down_proj: 128}}",
            "applies to target onnxruntime-genai only (target is onnxruntime-cpu)",
        ),
        ("\n  - quantize: {precision: int8, target: onnxruntime-genai, group_sizes: {mlp.down_proj: 48}}", "48"),
        ("\n  - quantize: {precision: int8, target: onnxruntime-genai, group_sizes: {.down_proj: 64}}", "suffix"),
    ],
    ids=["after-export", "float-head", "dynamic", "units-elsewhere", "units-group", "units-key"],
)
def test_int8_genai_refusals(tmp_path, capsys, stages, message):
    pipeline = tiny_pipeline(tmp_path, "refused8", stages, data=DATA)
    assert main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"]) == EXIT_CONFIG
    assert message in capsys.readouterr().err
