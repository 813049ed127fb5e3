"""TensorRT-readiness rules: real ONNX Runtime quantizer output, then one broken rule at a time."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from compress.checks.tensorrt import Violation, assert_tensorrt_ready, check_tensorrt
from compress.errors import StageError

from .conftest import init, int4_matmul_model, make_model, qdq_conv_model, weight_model


def rules(violations: list[Violation]) -> set[str]:
    return {v.rule for v in violations}


def nodes(violations: list[Violation]) -> set[str]:
    return {v.node for v in violations}


# ---- torch-exported CNNs quantized by onnxruntime ----------------------------------------------


@pytest.mark.parametrize("name", ["plain", "residual"])
def test_tensorrt_flavour_quantization_passes(cnn_paths, name):
    path = cnn_paths[f"{name}-trt"]
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "GlobalAveragePool"} <= ops
    assert check_tensorrt(path) == []
    assert check_tensorrt(model) == []
    assert_tensorrt_ready(path)  # does not raise


def test_float_export_passes(cnn_paths):
    assert check_tensorrt(cnn_paths["residual-fp32"]) == []


@pytest.mark.parametrize("name", ["plain", "residual"])
def test_onnxruntime_cpu_flavour_fails_on_zero_points(cnn_paths, name):
    violations = check_tensorrt(cnn_paths[f"{name}-cpu"])
    assert "qdq-zero-point" in rules(violations)
    assert rules(violations) <= {"qdq-zero-point", "qdq-type"}
    # every activation Q/DQ is UINT8 there; each one is named
    model = onnx.load(str(cnn_paths[f"{name}-cpu"]))
    activation_q = {n.name for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert activation_q <= nodes(violations)
    assert any("UINT8" in v.detail for v in violations)


def test_quantized_bias_is_rejected_with_the_fix(cnn_paths):
    """ORT's default QuantizeBias=True writes INT32 bias DequantizeLinear, which TensorRT refuses."""
    violations = check_tensorrt(cnn_paths["plain-trt-biasq"])
    assert rules(violations) == {"qdq-type"}
    assert nodes(violations) == {
        "c1.bias_DequantizeLinear",
        "c2.bias_DequantizeLinear",
        "fc.bias_DequantizeLinear",
    }
    assert all("QuantizeBias" in v.detail for v in violations)


def test_assert_raises_stage_error_listing_nodes(cnn_paths):
    with pytest.raises(StageError) as info:
        assert_tensorrt_ready(cnn_paths["plain-cpu"], source="runs/x/int8/model.onnx")
    msg = str(info.value)
    assert "runs/x/int8/model.onnx" in msg
    assert "x_QuantizeLinear" in msg and "qdq-zero-point" in msg


# ---- hand-built graphs, one rule at a time ------------------------------------------------------


def test_valid_hand_built_graph_passes():
    assert check_tensorrt(qdq_conv_model()) == []


def test_nonzero_int8_zero_point():
    v = check_tensorrt(qdq_conv_model(act_zp=np.array(3, np.int8)))
    assert rules(v) == {"qdq-zero-point"}
    assert nodes(v) == {"q_x", "dq_x"}
    assert "[3]" in v[0].detail


def test_uint8_zero_point_of_zero_is_a_type_violation():
    v = check_tensorrt(qdq_conv_model(act_zp=np.array(0, np.uint8)))
    assert rules(v) == {"qdq-type"}
    assert nodes(v) == {"q_x", "dq_x"}
    assert "UINT8" in v[0].detail


def test_activation_per_channel():
    v = check_tensorrt(qdq_conv_model(act_scale=np.full(4, 0.02, np.float32), act_zp=np.zeros(4, np.int8), act_axis=1))
    assert rules(v) == {"activation-per-tensor"}
    assert nodes(v) == {"q_x", "dq_x"}


def test_conv_weight_axis():
    v = check_tensorrt(qdq_conv_model(w_axis=1))
    assert rules(v) == {"weight-axis"}
    assert nodes(v) == {"dq_w"}
    assert "axis 0" in v[0].detail


@pytest.mark.parametrize(
    ("op", "shape", "axis", "attrs", "ok"),
    [
        ("Gemm", (10, 8), 0, {"transB": 1}, True),
        ("Gemm", (10, 8), 1, {"transB": 1}, False),
        ("Gemm", (8, 10), 1, {}, True),
        ("Gemm", (8, 10), 0, {}, False),
        ("MatMul", (8, 10), 1, {}, True),
        ("MatMul", (8, 10), -1, {}, True),
        ("MatMul", (8, 10), 0, {}, False),
        # (N, K) weight transposed to (K, N): the per-channel axis 0 lands on MatMul B's last axis
        ("MatMul", (10, 8), 0, {"transpose": (1, 0)}, True),
        ("MatMul", (10, 8), 1, {"transpose": (1, 0)}, False),
        ("ConvTranspose", (4, 6, 3, 3), 1, {}, True),
        ("ConvTranspose", (4, 6, 3, 3), 0, {}, False),
    ],
)
def test_weight_axis_per_consumer(op, shape, axis, attrs, ok):
    v = check_tensorrt(weight_model(op, shape, axis, **dict(attrs)))
    if ok:
        assert v == []
    else:
        assert rules(v) == {"weight-axis"}
        assert nodes(v) == {"dq_w"}
        assert "consumer" in v[0].detail


def test_opset_below_17():
    v = check_tensorrt(qdq_conv_model(opset=13))
    assert rules(v) == {"opset"}
    assert "13" in v[0].detail


def test_unsupported_default_domain_op():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    model = make_model([helper.make_node("Det", ["x"], ["y"], name="det")], [x], [y], [])
    v = check_tensorrt(model)
    assert rules(v) == {"unsupported-op"}
    assert [(x.node, x.op) for x in v] == [("det", "Det")]


def test_qoperator_op_is_unsupported():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    outs = [
        helper.make_tensor_value_info(n, t, shape)
        for n, t, shape in (
            ("q", TensorProto.UINT8, [4]),
            ("s", TensorProto.FLOAT, []),
            ("z", TensorProto.UINT8, []),
        )
    ]
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"], name="dyn_q")
    v = check_tensorrt(make_model([node], [x], outs, []))
    assert rules(v) == {"unsupported-op"}
    assert nodes(v) == {"dyn_q"}
    assert "target: tensorrt" in v[0].detail


def test_matmulnbits_is_unsupported():
    k, n, block = 32, 8, 16
    node = helper.make_node(
        "MatMulNBits",
        ["x", "b", "s"],
        ["y"],
        name="mm_nbits",
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=block,
    )
    inits = [
        init("b", np.zeros((n, k // block, block // 2), np.uint8)),
        init("s", np.ones((n * (k // block),), np.float32)),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])
    model = make_model([node], [x], [y], inits, extra_opsets=[("com.microsoft", 1)], check=False)
    v = check_tensorrt(model)
    assert rules(v) == {"unsupported-op"}
    assert nodes(v) == {"mm_nbits"}
    assert "com.microsoft" in v[0].detail and "target: tensorrt" in v[0].detail


def test_non_constant_scale():
    model = qdq_conv_model()
    graph = model.graph
    # feed the activation scale from a graph input instead of an initializer
    kept = [i for i in graph.initializer if i.name != "x_s"]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.input.append(helper.make_tensor_value_info("x_s", TensorProto.FLOAT, []))
    v = check_tensorrt(model)
    assert rules(v) == {"qdq-scale"}
    assert nodes(v) == {"q_x", "dq_x"}


# ---- INT4 ---------------------------------------------------------------------------------------


def test_int4_blocked_weight_only_passes():
    model, _, _ = int4_matmul_model()
    assert check_tensorrt(model) == []


def test_int4_blocked_weight_runs_on_onnxruntime_cpu():
    """ONNX Runtime runs the opset-21 blocked INT4 DequantizeLinear; outputs match numpy within 1e-4
    (float32 accumulation over K=32 of values ~1 stays ~1e-6 apart). At ORT's default optimisation level
    DQ+MatMul is fused to MatMulNBits with accuracy_level=4 (int8 activations), which differs by ~1e-2
    here, so the session pins accuracy level 0 (float) as ORT's session config documents."""
    model, w_q, scale = int4_matmul_model()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 32)).astype(np.float32)
    w = w_q * np.repeat(scale, 16, axis=0)  # (K, N): every block of 16 rows shares one scale per column
    expected = x @ w
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x})
    np.testing.assert_allclose(y, expected, atol=1e-4, rtol=0)
    basic = ort.SessionOptions()
    basic.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(model.SerializeToString(), basic, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], expected, atol=1e-4, rtol=0)


def test_int4_activation_fails():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    nodes_ = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q_x4"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["y"], name="dq_x4"),
    ]
    inits = [init("s", np.array(0.1, np.float32)), init("zp", np.array(0, dtype=ml_dtypes.int4))]
    v = check_tensorrt(make_model(nodes_, [x], [y], inits, opset=21))
    assert rules(v) == {"int4-blocked-weight-only"}
    assert nodes(v) == {"q_x4", "dq_x4"}


def test_int4_without_block_size_fails():
    w_q = np.zeros((32, 8), ml_dtypes.int4)
    nodes_ = [
        helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="dq_w4", axis=1),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    model = make_model(nodes_, [x], [y], [init("w_q", w_q), init("w_s", np.ones(8, np.float32))], opset=21)
    v = check_tensorrt(model)
    assert rules(v) == {"int4-blocked-weight-only"}
    assert nodes(v) == {"dq_w4"}
    assert "block_size" in v[0].detail


def test_int4_weight_feeding_conv_fails():
    w_q = np.zeros((4, 4, 3, 3), ml_dtypes.int4)
    nodes_ = [
        helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="dq_w4", axis=1, block_size=2),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv4"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 3])
    inits = [init("w_q", w_q), init("w_s", np.ones((4, 2, 3, 3), np.float32))]
    v = check_tensorrt(make_model(nodes_, [x], [y], inits, opset=21))
    assert rules(v) == {"int4-blocked-weight-only"}
    assert "Conv 'conv4'" in v[0].detail


def test_int4_needs_opset_21():
    model, _, _ = int4_matmul_model()
    model.opset_import[0].version = 19  # INT4 exists from opset 21 Q/DQ; block_size too
    v = check_tensorrt(model)
    assert "opset" in rules(v)
    assert any(x.node == "<model>" and "21" in x.detail for x in v)


def test_negative_scale_is_rejected():
    """ONNX Runtime's symmetric INT4 QDQ quantizer (1.31) writes signed scales; TensorRT wants > 0."""
    model, _, _ = int4_matmul_model()
    for t in model.graph.initializer:
        if t.name == "w_s":
            arr = onnx.numpy_helper.to_array(t).copy()
            arr[0, 0] = -arr[0, 0]
            t.CopyFrom(onnx.numpy_helper.from_array(arr, "w_s"))
    v = check_tensorrt(model)
    assert rules(v) == {"qdq-scale"}
    assert nodes(v) == {"dq_w4"}


def test_external_data_model_is_read_from_disk(cnn_paths, tmp_path):
    """Large models keep weights in external files; the zero points are read from there too."""
    model = onnx.load(str(cnn_paths["plain-cpu"]))
    expected = check_tensorrt(model)  # before saving: onnx.save(save_as_external_data) edits `model`
    path = tmp_path / "ext" / "model.onnx"
    path.parent.mkdir()
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (path.parent / "weights.bin").stat().st_size > 0
    assert check_tensorrt(path) == expected
    assert "qdq-zero-point" in rules(check_tensorrt(path))
