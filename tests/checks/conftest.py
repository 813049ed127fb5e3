"""Tiny graphs for the TensorRT-readiness rules: torch CNNs quantized by ONNX Runtime, and hand-built
ONNX graphs that each break one rule."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

IMAGE = (3, 16, 16)


class PlainCNN(nn.Module):
    """Conv-Relu-Conv-GlobalAveragePool-Gemm."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(torch.relu(self.c1(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))  # (B, 8) -> (B, 10)


class ResidualDepthwiseCNN(nn.Module):
    """Conv, depthwise Conv with a residual Add, pooling, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        y = y + torch.relu(self.dw(y))
        y = self.pw(y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))  # (B, 16) -> (B, 10)


def export_cnn(model: nn.Module, path: Path) -> Path:
    torch.manual_seed(0)
    model.eval()
    torch.onnx.export(
        model,
        (torch.randn(1, *IMAGE),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )
    return path


def quantize(src: Path, dst: Path, *, flavour: str, quantize_bias: bool = False) -> Path:
    """ONNX Runtime static QDQ quantization in the TensorRT or the ONNX Runtime CPU flavour."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": rng.random((2, *IMAGE), dtype=np.float32)} for _ in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    if flavour == "tensorrt":
        kw = dict(
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": quantize_bias,
            },
        )
    else:  # the ONNX Runtime CPU default: asymmetric uint8 activations
        kw = dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, **kw)
    return dst


@pytest.fixture(scope="session")
def cnn_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Float and quantized exports of both CNNs, made once per session (about 2 s)."""
    d = tmp_path_factory.mktemp("cnn")
    out: dict[str, Path] = {}
    for name, cls in (("plain", PlainCNN), ("residual", ResidualDepthwiseCNN)):
        torch.manual_seed(0)
        f = export_cnn(cls(), d / f"{name}.onnx")
        out[f"{name}-fp32"] = f
        out[f"{name}-trt"] = quantize(f, d / f"{name}.trt.onnx", flavour="tensorrt")
        out[f"{name}-cpu"] = quantize(f, d / f"{name}.cpu.onnx", flavour="cpu")
    out["plain-trt-biasq"] = quantize(
        out["plain-fp32"], d / "plain.trt-biasq.onnx", flavour="tensorrt", quantize_bias=True
    )
    return out


# ---- hand-built graphs ------------------------------------------------------------------------


def init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[TensorProto],
    *,
    opset: int = 17,
    extra_opsets: Sequence[tuple[str, int]] = (),
    check: bool = True,
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def qdq_conv_model(
    *,
    act_zp: np.ndarray | None = None,
    act_scale: np.ndarray | None = None,
    act_axis: int = 1,
    w_axis: int = 0,
    opset: int = 17,
) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(DQ(W int8 per-channel)) -> Relu: TensorRT-valid with the defaults."""
    rng = np.random.default_rng(0)
    w_q = rng.integers(-127, 128, size=(6, 4, 3, 3)).astype(np.int8)
    w_scale = np.full((w_q.shape[w_axis],), 0.01, np.float32)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["x_q"], name="q_x", axis=act_axis),
        helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_zp"], ["x_dq"], name="dq_x", axis=act_axis),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="dq_w", axis=w_axis),
        helper.make_node("Conv", ["x_dq", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    inits = [
        init("x_s", np.array(0.02, np.float32) if act_scale is None else act_scale),
        init("x_zp", np.array(0, np.int8) if act_zp is None else act_zp),
        init("w_q", w_q),
        init("w_s", w_scale),
        init("w_zp", np.zeros_like(w_scale, dtype=np.int8)),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])
    return make_model(nodes, [x], [y], inits, opset=opset)


def weight_model(op: str, w_shape: tuple[int, ...], axis: int, **attrs: object) -> onnx.ModelProto:
    """One int8 per-channel weight DQ feeding `op` (Gemm, MatMul, ConvTranspose; `transpose` inserts a
    Transpose between the DQ and a MatMul)."""
    rng = np.random.default_rng(1)
    transpose = attrs.pop("transpose", None)
    w_q = rng.integers(-127, 128, size=w_shape).astype(np.int8)
    scale = np.full((w_shape[axis],), 0.05, np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="dq_w", axis=axis)]
    w_name = "w"
    if transpose is not None:
        nodes.append(helper.make_node("Transpose", ["w"], ["w_t"], name="tr", perm=list(transpose)))
        w_name = "w_t"
    if op == "ConvTranspose":
        x_shape = [1, w_shape[0], 5, 5]
    else:
        k = w_shape[0] if op == "MatMul" and transpose is None else None
        if op == "MatMul" and transpose is not None:
            k = w_shape[transpose[0]]
        if op == "Gemm":
            k = w_shape[1] if attrs.get("transB", 0) else w_shape[0]
        x_shape = [2, k]
    nodes.append(helper.make_node(op, ["x", w_name], ["y"], name="consumer", **attrs))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(len(x_shape))])
    return make_model(nodes, [x], [y], [init("w_q", w_q), init("w_s", scale)])


def int4_matmul_model(
    k: int = 32, n: int = 8, block: int = 16, seed: int = 0
) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x (2, K) @ DQ_blocked(W int4 (K, N), scale (K/block, N)) at opset 21; returns model, W_q, scale."""
    rng = np.random.default_rng(seed)
    w_q = rng.integers(-8, 8, size=(k, n)).astype(ml_dtypes.int4)
    scale = (rng.random((k // block, n)) * 0.1 + 0.01).astype(np.float32)
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="dq_w4", axis=0, block_size=block),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])
    model = make_model(nodes, [x], [y], [init("w_q", w_q), init("w_s", scale)], opset=21)
    return model, w_q.astype(np.float32), scale
