"""ONNX rewrite: MatMulNBits and INT4 Q/DQ graphs run in ONNX Runtime and match the dequantized torch model.

Tolerance: the rewritten graph computes with exactly the dequantized weights, so the only difference
to torch is float32 summation order: 1e-4 absolute on logits of magnitude ~1 (measured ~2e-7).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compress.errors import StageError
from compress.quant.algorithms.gptq import GPTQConfig, gptq_quantize_model
from compress.quant.algorithms.rtn import rtn_quantize
from compress.quant.primitives.weight import WeightQuantConfig
from compress.quant.targets.onnx_rewrite import float_weights_of, quantize_onnx_weights, rewrite_onnx_file

from .conftest import calib_batches

EMB = "model.embed_tokens"


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _run(model: onnx.ModelProto | str | Path, ids: np.ndarray, **config: str) -> np.ndarray:
    so = ort.SessionOptions()
    for k, v in config.items():
        so.add_session_config_entry(k, v)
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: ids})[0]


def _dequantized_copy(model: nn.Module, qws: dict, emb=None) -> nn.Module:
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for n, qw in qws.items():
            mods[n].weight.copy_(qw.dequantize())
        if emb is not None:
            mods[EMB].weight.copy_(emb.dequantize())
    return m


@pytest.mark.parametrize("symmetric", [False, True])
def test_matmulnbits_graph_matches_torch(tiny_llama_onnx, tmp_path: Path, symmetric: bool) -> None:
    model, path = tiny_llama_onnx
    cfg = WeightQuantConfig(group_size=32, symmetric=symmetric)
    qws = {n: rtn_quantize(m.weight, cfg) for n, m in _linears(model).items()}  # lm_head included
    emb = rtn_quantize(model.model.embed_tokens.weight, cfg)
    fw = float_weights_of(model, [*qws, EMB])
    report = rewrite_onnx_file(path, tmp_path / "q.onnx", qws, fw, embeddings={EMB: emb})
    assert not report.unmatched and not report.unsupported and len(report.replaced) == 16
    # Really 4-bit: every float matrix is gone; ~0.5 byte/weight + scales vs 4 bytes/weight.
    assert report.size_after < 0.4 * report.size_before
    new = onnx.load(tmp_path / "q.onnx")
    ops = [n.op_type for n in new.graph.node]
    assert ops.count("MatMulNBits") == 15 and ops.count("GatherBlockQuantized") == 1
    shapes = {tuple(w.shape) for w in fw.values()} | {tuple(w.shape[::-1]) for w in fw.values()}
    assert not [
        i.name for i in new.graph.initializer if tuple(i.dims) in shapes and i.data_type != onnx.TensorProto.UINT8
    ]
    ids = calib_batches(1, seq=16)[0][:1]
    ref = _dequantized_copy(model, qws, emb)(ids).logits.detach().numpy()
    np.testing.assert_allclose(_run(tmp_path / "q.onnx", ids.numpy()), ref, atol=1e-4, rtol=0)


def test_accuracy_level_4_close(tiny_llama_onnx) -> None:
    """accuracy_level 4 quantizes activations to int8 inside MatMulNBits: looser, 2% of the logit range."""
    model, path = tiny_llama_onnx
    qws = {n: rtn_quantize(m.weight, WeightQuantConfig(group_size=32)) for n, m in _linears(model).items()}
    new, _ = quantize_onnx_weights(onnx.load(path), qws, float_weights_of(model, qws), accuracy_level=4)
    assert all(
        a.i == 4
        for n in new.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    )
    ids = calib_batches(1, seq=16)[0][:1]
    ref = _dequantized_copy(model, qws)(ids).logits.detach().numpy()
    assert np.abs(_run(new, ids.numpy()) - ref).max() < 0.02 * np.abs(ref).max()


def test_int4_qdq_graph_for_tensorrt(tiny_llama_onnx) -> None:
    model, path = tiny_llama_onnx
    qws = {
        n: rtn_quantize(m.weight, WeightQuantConfig(group_size=32, symmetric=True)) for n, m in _linears(model).items()
    }
    new, report = quantize_onnx_weights(onnx.load(path), qws, float_weights_of(model, qws), target="tensorrt")
    assert report.opset_raised_to == 21  # exported at 18, opset import raised (no version_converter)
    dq = [n for n in new.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 15
    inits = {i.name: i for i in new.graph.initializer}
    assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT4 and len(n.input) == 2 for n in dq)
    assert not any(n.domain == "com.microsoft" for n in new.graph.node)
    onnx.checker.check_model(new)
    ids = calib_batches(1, seq=16)[0][:1]
    ref = _dequantized_copy(model, qws)(ids).logits.detach().numpy()
    # ORT fuses DQ+MatMul into MatMulNBits with int8 activations (accuracy level 4) unless told otherwise.
    out = _run(new, ids.numpy(), **{"session.qdq_matmulnbits_accuracy_level": "0"})
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="symmetric"):  # an invariant: the stage's options refuse it first
        asym = {n: rtn_quantize(m.weight, WeightQuantConfig(group_size=32)) for n, m in _linears(model).items()}
        quantize_onnx_weights(onnx.load(path), asym, float_weights_of(model, asym), target="tensorrt")


def test_act_order_gptq_in_matmulnbits(tiny_llama_onnx) -> None:
    """A non-trivial g_idx is carried by permuting A's columns with a Gather before MatMulNBits."""
    model, path = tiny_llama_onnx
    qmodel = copy.deepcopy(model)
    cfg = GPTQConfig(group_size=32, act_order=True, static_groups=False)
    fw_before = float_weights_of(qmodel, [n for n in _linears(qmodel) if n != "lm_head"])
    qws = gptq_quantize_model(qmodel, calib_batches(2), config=cfg)
    assert any(not q.has_trivial_g_idx() for q in qws.values())
    new, report = quantize_onnx_weights(onnx.load(path), qws, fw_before)
    assert len(report.replaced) == 14
    ids = calib_batches(1, seq=16)[0][:1]
    ref = qmodel(ids).logits.detach().numpy()
    np.testing.assert_allclose(_run(new, ids.numpy()), ref, atol=1e-4, rtol=0)


def test_unmatched_is_reported_never_skipped(tiny_llama_onnx) -> None:
    model, path = tiny_llama_onnx
    w = torch.randn(32, 64)
    qws = {"ghost": rtn_quantize(w, WeightQuantConfig(group_size=32))}
    with pytest.raises(StageError, match="ghost"):
        quantize_onnx_weights(onnx.load(path), qws, {"ghost": w})
    _, report = quantize_onnx_weights(onnx.load(path), qws, {"ghost": w}, strict=False)
    assert report.unmatched == ["ghost"]


def test_gemm_with_bias_and_old_opset(tmp_path: Path) -> None:
    """TorchScript exports a 2-D Linear as Gemm(transB=1) with bias: replaced by MatMulNBits + Add."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(96, 48), nn.ReLU(), nn.Linear(48, 16)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 96),), str(tmp_path / "mlp.onnx"), dynamo=False, opset_version=17)
    base = onnx.load(tmp_path / "mlp.onnx")
    assert [n.op_type for n in base.graph.node].count("Gemm") == 2
    qws = {
        "0": rtn_quantize(net[0].weight, WeightQuantConfig(group_size=64)),  # 96 = 64 + 32: partial block
        "2": rtn_quantize(net[2].weight, WeightQuantConfig(group_size=16)),
    }
    fw = float_weights_of(net, qws)
    new, report = quantize_onnx_weights(base, qws, fw)
    assert set(report.replaced) == {"0", "2"}
    x = torch.randn(2, 96)
    deq = copy.deepcopy(net)
    with torch.no_grad():
        deq[0].weight.copy_(qws["0"].dequantize())
        deq[2].weight.copy_(qws["2"].dequantize())
    np.testing.assert_allclose(_run(new, x.numpy()), deq(x).detach().numpy(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="opset 21"):  # opset 17 cannot be raised safely to 21
        quantize_onnx_weights(base, qws, fw, target="tensorrt")


def _matmul_graph(w: torch.Tensor, opset: int = 21) -> onnx.ModelProto:
    """Y = A @ Wᵀ with Wᵀ as an initializer under an exporter-like name, plus an embedding Gather of W."""
    from onnx import TensorProto, helper, numpy_helper

    out_f, in_f = w.shape
    nodes = [
        helper.make_node("MatMul", ["A", "onnx::MatMul_7"], ["Y"]),
        helper.make_node("Gather", ["E", "ids"], ["G"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, in_f]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),
        ],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, out_f]),
            helper.make_tensor_value_info("G", TensorProto.FLOAT, [3, in_f]),
        ],
        [
            numpy_helper.from_array(w.T.contiguous().numpy(), "onnx::MatMul_7"),
            numpy_helper.from_array(w.numpy() * 2, "E"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


@pytest.mark.parametrize("group", [64, -1])
@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_partial_last_block_and_embedding_in_ort(target: str, group: int) -> None:
    """K = 96 with group 64 (last block of 32) or per row (one padded block of 128) runs in ORT."""
    from onnx import TensorProto

    torch.manual_seed(0)
    w = torch.randn(16, 96)
    cfg = WeightQuantConfig(group_size=group, symmetric=True)
    qw, qe = rtn_quantize(w, cfg), rtn_quantize(w * 2, cfg)
    new, report = quantize_onnx_weights(
        _matmul_graph(w), {"fc": qw}, {"fc": w, "emb": w * 2}, target=target, embeddings={"emb": qe}
    )
    assert set(report.replaced) == {"fc", "emb"} and report.dropped_initializers == 2
    a, ids = torch.randn(2, 96), torch.tensor([0, 15, 3])
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(new.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y, g = sess.run(None, {"A": a.numpy(), "ids": ids.numpy()})
    np.testing.assert_allclose(y, (a @ qw.dequantize().T).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(g, qe.dequantize()[ids].numpy(), atol=1e-6, rtol=0)
    if target == "tensorrt":
        assert {i.data_type for i in new.graph.initializer} == {TensorProto.INT4, TensorProto.FLOAT}


def test_save_onnx_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the protobuf limit the weights go to <name>.data, renamed into place with the model."""
    import compress.onnx_files
    import compress.quant.targets.onnx_rewrite as rw

    monkeypatch.setattr(compress.onnx_files, "EXTERNAL_BYTES", 0)
    w = torch.randn(16, 96)
    model = _matmul_graph(w)
    size = rw.save_onnx(model, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert size == sum(p.stat().st_size for p in tmp_path.iterdir())
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    a = torch.randn(2, 96)
    y = sess.run(["Y"], {"A": a.numpy(), "ids": np.array([0, 1, 2], np.int64)})[0]
    np.testing.assert_allclose(y, (a @ w.T).numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_8bit_override_in_ort(symmetric: bool) -> None:
    """bits 8 (per-layer override, e.g. for the LM head / embedding) runs as MatMulNBits / GBQ bits=8."""
    torch.manual_seed(0)
    w = torch.randn(16, 96)
    cfg = WeightQuantConfig(bits=8, group_size=32, symmetric=symmetric)
    qw, qe = rtn_quantize(w, cfg), rtn_quantize(w * 2, cfg)
    new, _ = quantize_onnx_weights(_matmul_graph(w), {"fc": qw}, {"fc": w, "emb": w * 2}, embeddings={"emb": qe})
    assert {a.i for n in new.graph.node if n.domain == "com.microsoft" for a in n.attribute if a.name == "bits"} == {8}
    sess = ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"])
    a, ids = torch.randn(2, 96), torch.tensor([0, 15, 3])
    y, g = sess.run(None, {"A": a.numpy(), "ids": ids.numpy()})
    np.testing.assert_allclose(y, (a @ qw.dequantize().T).numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(g, qe.dequantize()[ids].numpy(), atol=1e-6, rtol=0)
