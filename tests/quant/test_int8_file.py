"""Weight-only INT8 files on the tiny Llama: a tied table stored once, the bytes accounted for, logits = weights.

The expected size is derived from the model (codes 1 byte a weight, one fp32 scale a group, the float
norms), never read from the file under test; the logits are compared with torch running the weights the
file's MatMulNBits tensors dequantize to (the MatMulNBits spec: ``(code - 128) * scale`` without zero points).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llm_toys import VOCAB, tiny_llama  # noqa: E402

from compress.families.causal_lm.export import export_decoder  # noqa: E402
from compress.families.causal_lm.sessions import OrtCausalLM  # noqa: E402
from compress.quant.algorithms.int8_matmul import quantize_weight_only_int8  # noqa: E402

IDS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 24))
GROUP = 32


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def fp32(request, tmp_path_factory):
    model = tiny_llama(tie=request.param, seed=3)
    path = tmp_path_factory.mktemp("int8file") / "fp32.onnx"
    export_decoder(model, path)
    return model, path


def _module(node_name: str) -> str:
    """``/model/model/layers.0/mlp/up_proj/MatMul_Q8`` -> ``model.layers.0.mlp.up_proj`` (TorchScript scopes)."""
    return node_name.removeprefix("/model/").rsplit("/", 1)[0].replace("/", ".")


def _dequantized(model_proto: onnx.ModelProto) -> dict[str, torch.Tensor]:
    """{module: W (out, in)} from each MatMulNBits' B / scales / zero points, by the contrib-op spec."""
    inits = {t.name: numpy_helper.to_array(t) for t in model_proto.graph.initializer}
    out = {}
    for node in model_proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        assert a["bits"] == 8
        n, k, bs = a["N"], a["K"], a["block_size"]
        codes = inits[node.input[1]].reshape(n, -1)[:, :k].astype(np.float32)
        scales = inits[node.input[2]].reshape(n, -1)
        zp = inits[node.input[3]].reshape(n, -1).astype(np.float32) if len(node.input) > 3 else 128.0
        w = codes.reshape(n, -1, bs) - (zp[..., None] if np.ndim(zp) else zp)
        out[_module(node.name)] = torch.from_numpy((w * scales[..., None]).reshape(n, k))
    return out


def _float_tables(model_proto: onnx.ModelProto, hidden: int) -> list[str]:
    return [
        t.name
        for t in model_proto.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and sorted(t.dims) == sorted([VOCAB, hidden])
    ]


def _tensor_bytes(model_proto: onnx.ModelProto) -> int:
    """Bytes of every initializer and Constant tensor (what the file stores besides the graph's structure)."""
    tensors = list(model_proto.graph.initializer)
    tensors += [
        a.t for n in model_proto.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]
    return sum(numpy_helper.to_array(t).nbytes for t in tensors)


def _expected_bytes(model: torch.nn.Module, *, embedding_float: bool) -> int:
    """Codes (1 byte a weight) + fp32 scales (one per group) of every Linear; the norms and, untied, the
    float embedding at 4 bytes a value."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    codes = sum(m.weight.numel() for m in linears)
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    table = model.get_input_embeddings().weight.numel() if embedding_float else 0
    return codes + codes // GROUP * 4 + 4 * (norms + table)


def test_int8_file_holds_tied_table_once_and_computes_its_weights(fp32, tmp_path):
    model, src = fp32
    tied = model.config.tie_word_embeddings
    hidden = model.config.hidden_size
    out = quantize_weight_only_int8(src, tmp_path / "int8.onnx", group_size=GROUP, accuracy_level=0)
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    # tied: no float vocab x hidden table at all (the gather reads the head's codes); untied: the embedding's own
    assert len(_float_tables(proto, hidden)) == (0 if tied else 1)
    assert ops.count("GatherBlockQuantized") == (1 if tied else 0)
    expected = _expected_bytes(model, embedding_float=not tied)
    tensors = _tensor_bytes(proto)
    # beyond codes + scales + norms: the tied gather's explicit zero points (1 byte a group of the table)
    # and the graph's small constants (rotary frequencies, shapes): a few KB on this toy
    extra = VOCAB * hidden // GROUP if tied else 0
    assert expected <= tensors <= expected + extra + 8192, (tensors, expected)
    # the file = its tensors + the graph's structure, which the FP32 source has too (617 nodes, ~105 KB
    # here): at most 16 KB more for the few nodes and names the quantizer adds
    source = onnx.load(str(src))
    structure = src.stat().st_size - _tensor_bytes(source)
    assert out.stat().st_size <= tensors + structure + 16_384, (out.stat().st_size, tensors, structure)
    # logits of the file (float compute, accuracy_level 0) vs torch with the weights the file dequantizes to
    ref_model = tiny_llama(tie=tied, seed=3)
    weights = _dequantized(proto)
    assert set(weights) == {n for n, m in ref_model.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        for name, w in weights.items():
            ref_model.get_submodule(name).weight.copy_(w)
        if tied:
            assert ref_model.get_input_embeddings().weight.data_ptr() == ref_model.lm_head.weight.data_ptr()
        ref = ref_model(torch.from_numpy(IDS)).logits.numpy()
    got = OrtCausalLM(out).logits(IDS)
    # same weights, fp32 arithmetic in a different order: ~1e-6 seen; 1e-4 fails on any code/scale/layout slip
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert np.abs(OrtCausalLM(src).logits(IDS) - ref).max() > 1e-4  # the check sees 8-bit rounding at all


def test_old_layout_kept_a_float_table(fp32, tmp_path):
    """`share_table=False` is the layout before: the FP32 table stays beside the 8-bit head (what we measured)."""
    model, src = fp32
    if not model.config.tie_word_embeddings:
        pytest.skip("untied: both layouts are the same")
    old = quantize_weight_only_int8(src, tmp_path / "old.onnx", group_size=GROUP, share_table=False)
    new = quantize_weight_only_int8(src, tmp_path / "new.onnx", group_size=GROUP)
    table = VOCAB * model.config.hidden_size * 4
    assert old.stat().st_size - new.stat().st_size >= table - VOCAB * 8  # minus the gather's zero points etc.


def test_float_lm_head_keeps_its_float_table(fp32, tmp_path):
    model, src = fp32
    out = quantize_weight_only_int8(src, tmp_path / "int8.onnx", group_size=GROUP, lm_head=False)
    proto = onnx.load(str(out))
    tied = model.config.tie_word_embeddings
    assert len(_float_tables(proto, model.config.hidden_size)) == (1 if tied else 2)  # shared, or embed + head
    assert "GatherBlockQuantized" not in {n.op_type for n in proto.graph.node}
