"""Per-token dynamic W8A8 (`activations: token`): the graph computes per-token symmetric scales exactly as a
numpy reference does, ONNX Runtime still fuses it into MatMulIntegerToFloat, and one outlier token no longer
costs the other tokens their resolution."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from compress.bench.harness import int8_dot_saturates
from compress.quant.algorithms import DynamicOptions, SmoothQuantOptions
from compress.quant.algorithms.int8_matmul import quantize_dynamic_int8
from compress.quant.algorithms.smoothquant import fake_dynamic_w8a8


def _matmul_graph(w: np.ndarray, path, opset: int = 17) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, w.shape[1]])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))


def _reference(x: np.ndarray, w: np.ndarray, qmax: int) -> np.ndarray:
    """The per-token math in numpy: x per row max|x| / 127, zero point 128; w (in, out) per column / qmax."""
    xs = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-8) / 127
    xq = np.clip(np.round(x / xs) + 128, 0, 255) - 128
    ws = np.abs(w).max(axis=0) / qmax
    wq = np.clip(np.round(w / ws), -qmax, qmax)
    return (xq @ wq) * xs * ws


def _session(path, optimized=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 48, 64, generator=g)
    x[0, 7] *= 50  # one outlier token
    return x, torch.randn(32, 64, generator=g)  # w (out, in)


@pytest.mark.parametrize("opset", [17, 18])
def test_per_token_graph_is_the_numpy_reference(tmp_path, opset) -> None:
    """ORT running the rewritten graph against numpy doing the same integer math: equal up to float32
    accumulation order (1e-5 of the output range; one activation step is ~1e-2 of it), and so is the
    alpha search's simulation. ReduceMax takes its axes as an attribute at opset 17, as an input from 18."""
    x, w = _data()
    _matmul_graph(w.T.numpy().copy(), tmp_path / "mm.onnx", opset)
    saturates = int8_dot_saturates()
    q = quantize_dynamic_int8(tmp_path / "mm.onnx", tmp_path / "q.onnx", reduce_range=saturates, activations="token")
    ops = [n.op_type for n in onnx.load(str(q)).graph.node]
    assert "DynamicQuantizeLinear" not in ops and "MatMulInteger" in ops and "ReduceMax" in ops
    got = _session(q).run(None, {"x": x.numpy()})[0]
    ref = _reference(x.numpy().astype(np.float64), w.T.numpy().astype(np.float64), 64 if saturates else 127)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 1e-5 * scale
    sim = fake_dynamic_w8a8(x, w, reduce_range=saturates, per_token=True).numpy()
    assert np.abs(sim - ref).max() < 1e-5 * scale


def test_per_token_beats_per_tensor_beside_an_outlier_token(tmp_path) -> None:
    """One token 50x larger: with one scale per tensor the other tokens keep a few levels, per token they keep
        all 255. Seen: max error on the ordinary tokens per tensor 9.2, per token 0.36 (26x less; the output range
    is ~1060); asking for 5x less."""
    x, w = _data()
    _matmul_graph(w.T.numpy().copy(), tmp_path / "mm.onnx")
    exact = (x @ w.T).numpy()
    errors = {}
    for activations in ("tensor", "token"):
        q = quantize_dynamic_int8(
            tmp_path / "mm.onnx", tmp_path / activations / "q.onnx", reduce_range=False, activations=activations
        )
        got = _session(q).run(None, {"x": x.numpy()})[0]
        errors[activations] = float(np.abs(np.delete(got - exact, 7, axis=1)).max())
    assert errors["token"] < errors["tensor"] / 5, errors


def test_onnx_runtime_fuses_the_per_token_matmul(tmp_path) -> None:
    """After ORT's graph optimizations the MatMulInteger -> Cast -> Mul(scale (1, T, 1) x (N,)) chain is one
    MatMulIntegerToFloat (the fast kernel) and no MatMulInteger is left."""
    _, w = _data()
    _matmul_graph(w.T.numpy().copy(), tmp_path / "mm.onnx")
    q = quantize_dynamic_int8(tmp_path / "mm.onnx", tmp_path / "q.onnx", activations="token")
    _session(q, optimized=tmp_path / "opt.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 1 and "MatMulInteger" not in ops, ops


@pytest.mark.parametrize("options", [DynamicOptions, SmoothQuantOptions])
def test_activations_option_is_validated(options) -> None:
    assert options(activations="token").activations == "token"
    assert options().activations == "tensor"
    with pytest.raises(ValidationError, match=r"activations[\s\S]*'tensor' or 'token'"):
        options(activations="row")


def test_unknown_activations_refused_by_the_export(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"activations = 'row'; allowed: tensor, token"):
        quantize_dynamic_int8(tmp_path / "mm.onnx", tmp_path / "q.onnx", activations="row")


def test_per_token_joins_the_cache_key_and_tensor_keeps_the_old_one() -> None:
    from compress.stages.quantize.int8 import Int8Options

    def key(method):
        return Int8Options(precision="int8", method=method).cache_fields()["method"]

    assert "activations" not in key({"name": "dynamic"})
    assert "activations" not in key({"name": "dynamic", "activations": "tensor"})
    assert key({"name": "dynamic", "activations": "token"})["activations"] == "token"


def test_the_alpha_search_simulates_per_token() -> None:
    """`smooth_model(per_token=True)` scores with the per-token simulation: never worse than no smoothing,
    and its choices differ from the per-tensor search's on a decoder with outlier channels."""
    from llm_toys import tiny_llama

    from compress.quant.algorithms.smoothquant import smooth_model
    from tests.quant.test_smoothquant import _batches, with_outliers

    reports = {t: smooth_model(with_outliers(tiny_llama(tie=True)), _batches(2), per_token=t) for t in (False, True)}
    assert max(reports[True].error_ratio.values()) <= 1.0
    assert reports[True].error_ratio != reports[False].error_ratio
