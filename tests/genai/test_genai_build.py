"""onnxruntime-genai's fused decoder graph on a tiny random Llama, from its own weights and from ours.

Logits come from ONNX Runtime (an InferenceSession on the builder's model.onnx with an empty past):
the graph outputs logits for every position, which the GenAI Generator does not hand back in full.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from llm.llm_toys import VOCAB, tiny_llama, tiny_tokenizer
from onnx import numpy_helper

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'compress[llm]')")

from compress.genai.build import build_fused_decoder  # noqa: E402
from compress.quant.int4 import GPTQConfig, WeightQuantConfig, gptq_quantize_model, rtn_quantize_model  # noqa: E402
from compress.quant.int4.packing import MatMulNBitsTensors, unpack_matmul_nbits  # noqa: E402

HIDDEN, KV_HEADS, HEAD = 64, 2, 16
IDS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 17)).astype(np.int64)
EVERY_LINEAR = lambda name, module: True  # noqa: E731 - the lm_head too


def _save(folder: Path, tie: bool) -> tuple[Path, torch.nn.Module]:
    model = tiny_llama(tie=tie)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("genai") / "hf-tied", tie=True)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("genai") / "hf-untied", tie=False)


def _graph(out: Path) -> onnx.ModelProto:
    return onnx.load(str(out / "model.onnx"))


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _ort_logits(out: Path) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": IDS, "attention_mask": np.ones_like(IDS)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((IDS.shape[0], KV_HEADS, 0, HEAD), np.float32)  # (B, kv_heads, 0, head)
    return session.run(["logits"], feed)[0]


def _torch_logits(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).logits.numpy()


def _nbits_weights(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    """``{node name: dequantized W [N, K]}`` of every MatMulNBits, read with our own unpacker."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
        attrs = {a.name: a.i for a in node.attribute}
        zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
        t = MatMulNBitsTensors(
            inits[node.input[1]], inits[node.input[2]], zp, attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        )
        out[node.name] = unpack_matmul_nbits(t).dequantize()
    return out


def _ours_fp16_scales(qw) -> torch.Tensor:
    """Our dequantized weight with the scales rounded to fp16, the AutoGPTQ layout's scale type."""
    gi = qw.group_index()
    scales = qw.scales.half().float()
    return (qw.qweight.float() - qw.zeros.float()[:, gi]) * scales[:, gi]


def _expected_nodes(qws) -> dict[str, torch.Tensor]:
    """Our weights under the builder's node names (q, k, v packed along N)."""
    expected = {}
    for i in range(2):
        p = f"model.layers.{i}"
        attn = [_ours_fp16_scales(qws[f"{p}.self_attn.{x}_proj"]) for x in "qkv"]
        expected[f"/model/layers.{i}/attn/qkv_proj/MatMulNBits"] = torch.cat(attn)
        expected[f"/model/layers.{i}/attn/o_proj/MatMulNBits"] = _ours_fp16_scales(qws[f"{p}.self_attn.o_proj"])
        for x in ("gate", "up", "down"):
            expected[f"/model/layers.{i}/mlp/{x}_proj/MatMulNBits"] = _ours_fp16_scales(qws[f"{p}.mlp.{x}_proj"])
    if "lm_head" in qws:
        expected["/lm_head/MatMulNBits"] = _ours_fp16_scales(qws["lm_head"])
    return expected


def test_fp32_fused_graph_matches_torch(tied, tmp_path):
    folder, model = tied
    out = build_fused_decoder(folder, tmp_path / "fp32", precision="fp32")
    graph = _graph(out)
    ops = _ops(graph)
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] >= 3
    qkv = [n for n in graph.graph.node if n.name == "/model/layers.0/attn/qkv_proj/MatMul"]
    inits = {t.name: t for t in graph.graph.initializer}
    assert list(inits[qkv[0].input[1]].dims) == [HIDDEN, HIDDEN + 2 * KV_HEADS * HEAD]  # packed QKV [K, q+2kv]
    ours, theirs = _ort_logits(out), _torch_logits(model)
    # fp32 both sides, fused kernels sum in another order: measured 3.6e-7 on logits of magnitude ~1.4
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "model.onnx"


@pytest.mark.parametrize("method", ["rtn-asym", "gptq-sym"])
def test_int4_from_our_weights_is_our_weights(tied, tmp_path, method):
    folder, _ = tied
    model = tiny_llama(tie=True)
    if method == "rtn-asym":
        qws = rtn_quantize_model(model, config=WeightQuantConfig(group_size=32), layers_filter=EVERY_LINEAR)
    else:
        batches = [torch.from_numpy(np.random.default_rng(s).integers(3, VOCAB, size=(2, 24))) for s in range(4)]
        cfg = GPTQConfig(group_size=32, symmetric=True)
        qws = gptq_quantize_model(model, batches, config=cfg, layers_filter=EVERY_LINEAR)
    if "lm_head" not in qws:  # a tied lm_head is skipped by the quantizer's walk: the table it shares is the embedding
        qws = {
            **qws,
            **rtn_quantize_model(
                model,
                config=WeightQuantConfig(group_size=32, symmetric=method != "rtn-asym"),
                layers_filter=lambda n, m: n == "lm_head",
            ),
        }
    out = build_fused_decoder(folder, tmp_path / "int4", precision="int4", quantized=qws, accuracy_level=1)
    graph = _graph(out)
    got, expected = _nbits_weights(graph), _expected_nodes(qws)
    assert set(got) == set(expected)
    for name, w in expected.items():
        assert torch.equal(got[name], w), name  # codes and zero points exact, scales as fp16
    # the same model in torch, with our dequantized weights (scales as fp16 too)
    with torch.no_grad():
        modules = dict(model.named_modules())
        for name, qw in qws.items():
            modules[name].weight.copy_(_ours_fp16_scales(qw))
    # accuracy_level 1 = fp32 activations: only summation order differs (measured <1e-5)
    np.testing.assert_allclose(_ort_logits(out), _torch_logits(model), atol=1e-4, rtol=0)
