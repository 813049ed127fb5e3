"""The layer-by-layer fused-graph writer (compress/genai/layered.py) against onnxruntime-genai's builder run on the
whole streamed folder, on a 5-layer tiny Llama with 1000 tokens (the 2-layer, 64- and 72-token patterns grown to 5
layers and 1000 tokens): same nodes, graph inputs / outputs, initializers byte for byte, genai_config.json, and
logits. Random weights: no quality."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from llm_toys import VOCAB, genai_logits, tiny_llama, tiny_tokenizer
from onnx import numpy_helper

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'compress[llm]')")

from compress.genai import layered  # noqa: E402
from compress.genai.build import build_fused_decoder  # noqa: E402
from compress.quant.primitives.weight import WeightQuantConfig  # noqa: E402
from compress.quant.streamed import build_streamed_decoder, stream_quantize  # noqa: E402

LAYERS = 5
IDS = np.random.default_rng(0).integers(3, VOCAB, size=(1, 17)).astype(np.int64)
CFG = WeightQuantConfig(group_size=32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("layered")
    out = {}
    for tie in (True, False):
        folder = root / f"hf-{tie}"
        tiny_llama(tie=tie, layers=LAYERS).save_pretrained(folder, max_shard_size="100KB")
        tiny_tokenizer().save_pretrained(folder)
        out[tie] = folder
    return out


def _nodes(model) -> list[tuple]:
    return [(n.op_type, n.name, list(n.input), list(n.output), list(n.attribute)) for n in model.graph.node]


@pytest.mark.parametrize(
    "tie,lm_head,prune", [(True, "int4", False), (False, "int4", False), (False, "float", False), (True, "int4", True)]
)
def test_layered_graph_equals_builders_full_graph(models, tie, lm_head, prune, tmp_path, monkeypatch) -> None:
    # head / embedding in several blocks with a short last one (1000 = 7 * 136 + 48; hidden 64 = 2 * 24 + 16)
    monkeypatch.setattr(layered, "HEAD_BLOCK", 136)
    monkeypatch.setattr(layered, "HIDDEN_BLOCK", 24)
    q = stream_quantize(models[tie], tmp_path / "q", CFG, lm_head=lm_head).folder
    ref = build_fused_decoder(
        q, tmp_path / "ref", precision="int4", block_size=32, symmetric=False, lm_head=lm_head, prune_lm_head=prune
    )
    said: list[str] = []
    ours = build_streamed_decoder(q, tmp_path / "ours", lm_head=lm_head, prune_lm_head=prune, say=said.append)
    assert f"layer {LAYERS}/{LAYERS} written" in said  # the layered writer ran, not the builder on 5 layers

    a, b = (onnx.load(str(d / "model.onnx")) for d in (ref, ours))
    assert _nodes(a) == _nodes(b)
    assert a.graph.input == b.graph.input and a.graph.output == b.graph.output
    assert sorted(v.name for v in a.graph.value_info) == sorted(v.name for v in b.graph.value_info)
    inits_a = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    inits_b = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert inits_a.keys() == inits_b.keys()
    for name, value in inits_a.items():
        other = inits_b[name]
        assert (value.dtype, value.shape) == (other.dtype, other.shape) and value.tobytes() == other.tobytes(), name
    assert json.loads((ref / "genai_config.json").read_text()) == json.loads((ours / "genai_config.json").read_text())
    assert json.loads((ours / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == LAYERS
    # the graph proto holds names and offsets: every weight is in the one data file, written in graph order
    proto = onnx.load(str(ours / "model.onnx"), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    ends = [sum(int(e.value) for e in t.external_data if e.key in ("offset", "length")) for t in external]
    assert ends[-1] == (ours / "model.onnx.data").stat().st_size and ends == sorted(ends)
    # same graph, same bytes, same kernels: equal logits (the stated tolerance, 1e-5, is not even needed)
    np.testing.assert_allclose(genai_logits(ours, IDS), genai_logits(ref, IDS), rtol=0, atol=1e-5)


def test_conversion_that_differs_from_the_builder_is_refused(models, tmp_path, monkeypatch) -> None:
    """Layers 0 and 1 are checked against the builder's own pattern: a wrong source map never writes a file."""
    q = stream_quantize(models[True], tmp_path / "q", CFG, lm_head="int4").folder
    swapped = {**layered.PROJECTIONS, "mlp.gate_proj": ("mlp.up_proj",), "mlp.up_proj": ("mlp.gate_proj",)}
    monkeypatch.setattr(layered, "PROJECTIONS", swapped)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.MatMulNBits\.qweight: .* differ"):
        build_streamed_decoder(q, tmp_path / "ours", lm_head="int4")
    assert not (tmp_path / "ours").exists() and not list(tmp_path.glob(".ours.*"))


def test_missing_layer_file_is_named(models, tmp_path) -> None:
    q = stream_quantize(models[True], tmp_path / "q", CFG, lm_head="int4").folder
    (q / "layer-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['layer-00003.safetensors'\]"):
        build_streamed_decoder(q, tmp_path / "ours", lm_head="int4")
