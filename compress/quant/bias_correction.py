"""Bias correction of a static Q/DQ graph: shift each quantized Conv / Gemm bias by the mean output error.

Our own code, because neither maintained library does it for the graph `quantize_static` writes:
`onnxruntime.quantization` has no bias correction, and NNCF's (Fast)BiasCorrection runs inside NNCF's own
quantization of a float model (its own Q/DQ placement), not on an ONNX Runtime Q/DQ graph.

The method (empirical bias correction, Nagel et al. 2019, "Data-Free Quantization", section 4.2; what NNCF
calls BiasCorrection): weight rounding and the quantized inputs a layer receives shift the mean of each of
its output channels; a bias absorbs that shift. For each quantized Conv / Gemm with a bias, in graph order,
on the calibration batches: `delta[c] = mean(float output[c]) - mean(Q/DQ output[c])` (means over batch and
space), then `bias[c] += delta[c]`. In graph order, with the layers before it already corrected, so a
layer does not also absorb the shift that an earlier layer's correction removes (correcting every layer at
once from one pass counts that shift twice). One pass of the Q/DQ graph per corrected layer.

The Q/DQ graph runs as it ships (ONNX Runtime's integer kernels), cut down to what the layer's output needs,
with that output as the graph's output: ORT then leaves that one layer as DequantizeLinear -> float op (its
accumulation, before its QuantizeLinear, can be read) and every layer before it in its integer kernels. On
MobileNetV2 that was 4-6x faster than running the whole graph with Q/DQ fusion off, and it measures the
kernels the file runs with (the two agree to 0.1-4% of a channel's mean here). A graph the target evaluates
with the fusion off (TensorRT's flavour, `session.disable_quant_qdq`) is measured that way instead.
An INT32 bias (`QuantizeBias`, scale = input scale x
weight scale) moves by `round(delta / scale)` steps; a float bias (the TensorRT flavour) by `delta`.
Layers without a bias input (and MatMul) are left as they are and counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

VERSION = 1  # joins the quantize stage's cache key when bias_correction is on
_OPS = ("Conv", "Gemm")
_INT32 = np.iinfo(np.int32)


@dataclass
class _Bias:
    """Where one quantized layer's bias lives in the Q/DQ graph."""

    node: str
    output: str  # the layer's output tensor (before its QuantizeLinear)
    values: str  # initializer: int32 codes (with `scale`) or float values (scale None)
    scale: str | None


def _initializers(model) -> dict[str, Any]:  # noqa: ANN001 - onnx.ModelProto
    return {t.name: t for t in model.graph.initializer}


def _quantized_layers(model) -> tuple[list[_Bias], int]:  # noqa: ANN001 - onnx.ModelProto
    """The Conv / Gemm nodes whose weight comes from a DequantizeLinear, with their bias (graph order), and how
    many such layers have no bias to shift."""
    inits = _initializers(model)
    producer = {out: n for n in model.graph.node for out in n.output}
    layers, no_bias = [], 0
    for node in model.graph.node:
        if node.op_type not in _OPS or len(node.input) < 2:
            continue
        weight = producer.get(node.input[1])
        if weight is None or weight.op_type != "DequantizeLinear":
            continue  # left float (nodes_to_exclude, a fallback)
        if len(node.input) < 3 or not node.input[2]:
            no_bias += 1
            continue
        bias = node.input[2]
        if bias in inits:
            layers.append(_Bias(node.name, node.output[0], bias, None))
            continue
        dq = producer.get(bias)
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits and dq.input[1] in inits:
            layers.append(_Bias(node.name, node.output[0], dq.input[0], dq.input[1]))
        else:
            no_bias += 1
    return layers, no_bias


def _only(model, outputs: Sequence[str]) -> None:  # noqa: ANN001 - onnx.ModelProto
    """Cut `model` down to the nodes `outputs` depend on, with `outputs` as its outputs (a layer early in the
    graph then costs a fraction of a full pass)."""
    import onnx

    needed, keep = set(outputs), []
    for node in reversed(model.graph.node):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
    used = {name for node in keep for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _channel_means(
    model_bytes: bytes,
    outputs: Sequence[str],
    batches: Sequence[dict[str, np.ndarray]],
    threads: int,
    config: Mapping[str, str],
) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) means of `outputs` over every batch, sample and position."""
    import onnx
    import onnxruntime as ort

    from compress.backends.onnxruntime_backend import session_options

    model = onnx.load_from_string(model_bytes)
    _only(model, outputs)
    opts = session_options(threads, config)
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in batches:
        values = dict(zip(names, session.run(None, batch), strict=True))
        for name in outputs:
            v = values[name].astype(np.float64)
            axes = (0, *range(2, v.ndim))
            sums[name] = sums.get(name, 0.0) + v.sum(axis=axes)
            counts[name] = counts.get(name, 0) + v.size // v.shape[1]
    return {name: sums[name] / counts[name] for name in outputs}


def _shift(layer: _Bias, inits: dict[str, Any], delta: np.ndarray) -> None:
    """Add `delta` (output units) to the layer's bias: float values, or INT32 codes in steps of their scale."""
    from onnx import numpy_helper

    tensor = inits[layer.values]
    values = numpy_helper.to_array(tensor)
    if layer.scale is None:
        new = (values.astype(np.float64) + delta).astype(values.dtype)
    else:
        scale = numpy_helper.to_array(inits[layer.scale]).astype(np.float64)
        steps = np.round(delta / scale)
        new = np.clip(values.astype(np.int64) + steps, _INT32.min, _INT32.max).astype(values.dtype)
    tensor.CopyFrom(numpy_helper.from_array(new, tensor.name))


def shift_biases(qdq_model: Path, deltas: Mapping[str, np.ndarray]) -> int:
    """Apply `deltas` (from `correct_biases` on the full Q/DQ graph of the same recipe) to the layers of
    `qdq_model` that are still quantized, in place; nodes left float keep their float bias (their shift drops).
    An INT32 bias moves by `round(delta / its scale)`: the recipe's ranges give a still-quantized layer the same
    scale as in the full graph, so its codes match the full graph's corrected ones. Returns the layers shifted."""
    import onnx

    qdq = onnx.load(str(qdq_model))
    layers, _ = _quantized_layers(qdq)
    inits = _initializers(qdq)
    shifted = [layer for layer in layers if layer.node in deltas]
    for layer in shifted:
        _shift(layer, inits, deltas[layer.node])
    onnx.save(qdq, str(qdq_model))
    return len(shifted)


def correct_biases(
    float_model: Path,
    qdq_model: Path,
    batches: Sequence[dict[str, np.ndarray]],
    *,
    threads: int,
    session_config: Mapping[str, str] | None = None,
    deltas: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Shift the biases of `qdq_model` (written from `float_model` by quantize_static, same node names) in place
    so each quantized layer's per-channel output mean on `batches` matches the float graph's, the Q/DQ graph run
    with `session_config` (the target's: its integer kernels, or the float simulation of TensorRT's); returns what was
    done (layers corrected, layers without a bias, the mean absolute shift in the outputs' units). `deltas`, if
    given, receives each corrected node's per-channel shift (for `shift_biases` on other graphs of the recipe)."""
    import onnx

    qdq = onnx.load(str(qdq_model))
    layers, no_bias = _quantized_layers(qdq)
    if not layers:
        return {"corrected_layers": 0, "layers_without_bias": no_bias}
    float_proto = onnx.load(str(float_model))
    float_out = {n.name: n.output[0] for n in float_proto.graph.node}
    missing = [layer.node for layer in layers if layer.node not in float_out]
    if missing:
        raise ValueError(
            f"bias correction: nodes {missing[:3]} of {qdq_model} are not in {float_model}; the Q/DQ graph must be "
            "written from that float graph"
        )
    reference = _channel_means(
        float_proto.SerializeToString(), [float_out[layer.node] for layer in layers], batches, threads, {}
    )
    inits = _initializers(qdq)
    shifts = []
    for layer in layers:
        ours = _channel_means(qdq.SerializeToString(), [layer.output], batches, threads, session_config or {})[
            layer.output
        ]
        delta = reference[float_out[layer.node]] - ours
        _shift(layer, inits, delta)
        shifts.append(float(np.abs(delta).mean()))
        if deltas is not None:
            deltas[layer.node] = delta
    onnx.save(qdq, str(qdq_model))
    return {
        "corrected_layers": len(layers),
        "layers_without_bias": no_bias,
        "mean_abs_shift": round(float(np.mean(shifts)), 6),
    }
