"""INT8 on the ONNX side. Three methods; `auto` asks the adapter (vision: static, causal-lm: weight-only):

- `static`: calibrated Q/DQ with `onnxruntime.quantization.quantize_static` (CNNs: activations are
  quantized too, and ONNX Runtime runs the convolutions in INT8).
- `weight-only`: `MatMulNBits` with 8-bit blocked weights (`accuracy_level` 4 computes with INT8
  activations inside the kernel). For decoder LLMs it decodes fastest and keeps perplexity: measured on
  SmolLM2-135M, dynamic W8A8 raised perplexity by 58% where weight-only raised it by < 1%.
- `dynamic`: W8A8 with per-row dynamic activation scales (`quantize_dynamic`, MatMul only).

Transformers (a graph with LayerNormalization or Softmax: ViTs, ConvNeXt) get Q/DQ on MatMul / Gemm /
Conv only: LayerNorm, Softmax, GELU (Erf) and the residual Adds stay float, because 8-bit per-tensor
ranges are where such models lose their accuracy (LayerNorm inputs carry outlier channels, Softmax spans
orders of magnitude) and neither ONNX Runtime nor TensorRT runs those ops faster in INT8. The artifact's
info lists the op types left float (`float_op_types`, node counts) and `report.md` says why.

The static Q/DQ flavour follows the deployment target, because the two disagree (measured on this CPU
with MobileNetV2, see README):
- `onnxruntime-cpu`: uint8 asymmetric activations, int8 symmetric per-channel weights. ONNX Runtime's
  x86 kernels (VNNI) are fast for u8·s8; symmetric s8 activations were slower than FP32 here.
- `tensorrt`: int8 symmetric activations (per-tensor) and weights (per-channel), zero point 0 — TensorRT's
  explicit-quantization rules. Every artifact for this target is checked against those rules on CPU.
  On CPU such an artifact is evaluated with ONNX Runtime's Q/DQ fusion off (`session.disable_quant_qdq`):
  each DequantizeLinear feeds a float op, which is the arithmetic TensorRT's int8 kernels reproduce (int32
  accumulation). ORT's own integer kernels would measure something else: on a CPU without VNNI they
  saturate (below), which cost a tiny CNN 12 points of agreement with its FP32 graph where the float
  simulation lost 4. Its CPU latency is therefore not an int8 latency (the report says so).

On an x86 CPU without VNNI (AVX2 only) ONNX Runtime computes u8·s8 with VPMADDUBSW, whose int16 pair sums
saturate; its documentation's remedy is `reduce_range: true` (7-bit weights) or evaluating on the CPU that
will run the model. The stage says so in the log and in `info.int8_dot_saturates` when it runs on one.

The input must be float (an INT4 or INT8 artifact is refused, at validate time where the plan shows it),
and the output must hold quantized nodes: weight-only and dynamic quantize MatMul weights only, so on a
CNN they would write the float graph back; the stage fails instead and says to use `static`. Models over
~1.8 GB (or read from external data) are written as `model.onnx` + `model.onnx.data`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from compress.backends import ORT_SESSION_CONFIG
from compress.bench.harness import int8_dot_saturates
from compress.errors import StageError
from compress.onnx_files import data_file, wants_external_data
from compress.progress import quiet_third_party
from compress.schema import Count, Real
from compress.stages.base import StageContext, StageOptions, StageOutput
from compress.stages.quantize.common import input_problem, refuse_quantized_input, require_quantized

CALIBRATORS = ("minmax", "entropy", "percentile")
#: ONNX Runtime session entry: run Q/DQ pairs as written (no fusion into integer kernels)
DISABLE_QDQ_FUSION = "session.disable_quant_qdq"


class Int8Options(StageOptions):
    """Calibrated static INT8 (Q/DQ) for an ONNX artifact."""

    accepts: ClassVar[frozenset[str]] = frozenset({"onnx"})
    precision: Literal["int8"]
    method: Literal["auto", "static", "weight-only", "dynamic"] = Field(
        "auto", description="auto: the model family's best (vision: static, causal-lm: weight-only)"
    )
    target: Literal["onnxruntime-cpu", "tensorrt"] = Field("onnxruntime-cpu", description="deployment target")
    calibrator: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="how activation ranges are chosen"
    )
    percentile: Real = Field(99.999, gt=90, le=100, description="percentile calibrator: range kept")
    samples: Count = Field(256, gt=0, description="calibration samples drawn from data.calibration")
    per_channel: bool = Field(True, description="per-channel weight scales")
    reduce_range: bool = Field(
        False, description="static: 7-bit weights, avoids ONNX Runtime's u8·s8 saturation on CPUs without VNNI"
    )
    exclude_nodes: tuple[str, ...] = Field((), description="node names kept in float")
    op_types: tuple[str, ...] | None = Field(
        None, description="only quantize these op types (default: all ORT supports)"
    )
    block_size: Count = Field(32, ge=16, description="weight-only: weights per scale along K (a power of two)")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(4, description="weight-only: MatMulNBits compute type; 4 = INT8")
    include_lm_head: bool = Field(True, description="weight-only / dynamic: quantize the output projection too")

    def output_precision(self, input_precision: str) -> str:
        return "int8"

    def input_precision_problem(self, name: str, precision: str) -> str | None:
        return input_problem(name, precision, "quantize int8")


class _Reader:
    """onnxruntime CalibrationDataReader over the adapter's calibration inputs."""

    def __init__(self, batches: Iterator[dict[str, np.ndarray]], total: int, task) -> None:
        self._batches, self._task = batches, task

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is not None:
            self._task.advance(len(next(iter(batch.values()))))
        return batch


#: what to do when a method quantized nothing
_NOTHING_QUANTIZED = {
    "static": "check op_types and exclude_nodes",
    "weight-only": "weight-only quantizes MatMul weights only; use method: static",
    "dynamic": "dynamic quantizes MatMul weights only; use method: static",
}


def quantize_int8(artifact, options: Int8Options, ctx: StageContext) -> StageOutput:
    method = ctx.adapter.default_int8_method if options.method == "auto" else options.method
    refuse_quantized_input(artifact, "quantize int8")
    out = _static(artifact, options, ctx) if method == "static" else _matmul(artifact, options, method, ctx)
    nodes = require_quantized(
        ctx.outdir / out.file, artifact.main, f"quantize int8 ({method})", _NOTHING_QUANTIZED[method]
    )
    out.info["quantized_nodes"] = nodes
    return out


def _matmul(artifact, options: Int8Options, method: str, ctx: StageContext) -> StageOutput:
    """Weight-only (MatMulNBits) or dynamic (MatMulInteger) INT8 of the MatMul weights."""
    if options.target == "tensorrt":
        raise StageError(
            f"quantize int8: method '{method}' writes com.microsoft ops that TensorRT cannot build; "
            "use method: static for target: tensorrt"
        )
    from compress.llm.quant_int8 import quantize_dynamic_int8, quantize_weight_only_int8

    start = time.perf_counter()
    out = ctx.outdir / "model.onnx"
    with ctx.reporter.task(f"quantize int8 ({method})", total=None):
        if method == "weight-only":
            quantize_weight_only_int8(
                artifact.main,
                out,
                block_size=options.block_size,
                accuracy_level=options.accuracy_level,
                include_lm_head=options.include_lm_head,
            )
            info = {
                "weights": f"int8 symmetric, blocks of {options.block_size} (MatMulNBits)",
                "accuracy_level": options.accuracy_level,
            }
        else:
            quantize_dynamic_int8(
                artifact.main, out, per_channel=options.per_channel, include_lm_head=options.include_lm_head
            )
            info = {"weights": "int8 per-channel", "activations": "int8 dynamic per-row"}
    info.update(method=method, seconds=round(time.perf_counter() - start, 1), lm_head=options.include_lm_head)
    return StageOutput(file="model.onnx", format="onnx", precision="int8", info=info, target=options.target)


def _static(artifact, options: Int8Options, ctx: StageContext) -> StageOutput:
    with quiet_third_party():  # importing ORT's quantization configures root logging
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

    transformer = None if options.op_types else _transformer_op_types(artifact.main)
    if transformer:
        options = options.model_copy(update={"op_types": tuple(transformer)})
    tensorrt = options.target == "tensorrt"
    # ONNX Runtime writes scratch files beside its input: the pre-processed graph lives in a folder of ours.
    pre = ctx.outdir / "_pre" / "model.onnx"
    pre.parent.mkdir()
    large = wants_external_data(artifact.main)
    with quiet_third_party():
        # Symbolic shape inference keeps the graph in one proto, which cannot be saved beyond 2 GB.
        pre_process(
            str(artifact.main),
            str(pre),
            skip_symbolic_shape=large,
            save_as_external_data=large,
            all_tensors_to_one_file=True,
            external_data_location=data_file(pre).name,
        )
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[options.calibrator]
    # TensorRT takes biases in float (it fuses them itself); an INT32 bias DequantizeLinear breaks its rules.
    extra = {
        "WeightSymmetric": True,
        "ActivationSymmetric": tensorrt,
        "CalibPercentile": options.percentile,
        "QuantizeBias": not tensorrt,
    }
    if transformer:  # their outputs too: else the Add / Mul / Softmax after them would read 8-bit values
        extra["OpTypesToExcludeOutputQuantization"] = transformer
    out = ctx.outdir / "model.onnx"
    start = time.perf_counter()
    with ctx.reporter.task(
        f"calibrate ({options.calibrator}, {options.samples} samples)", total=options.samples
    ) as task:
        reader = _Reader(ctx.adapter.calibration_inputs(options.samples, batch_size=8), options.samples, task)
        CalibrationDataReader.register(_Reader)
        with quiet_third_party():
            quantize_static(
                str(pre),
                str(out),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=options.per_channel,
                activation_type=QuantType.QInt8 if tensorrt else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                nodes_to_exclude=list(options.exclude_nodes) or None,
                op_types_to_quantize=list(options.op_types) if options.op_types else None,
                use_external_data_format=large,
                reduce_range=options.reduce_range,
                extra_options=extra,
            )
    shutil.rmtree(pre.parent)
    info = {
        "method": "static",
        "calibration_seconds": round(time.perf_counter() - start, 1),
        "calibrator": options.calibrator,
        "activations": "int8 symmetric" if tensorrt else "uint8 asymmetric",
        "weights": "int8 symmetric per-channel" if options.per_channel else "int8 symmetric per-tensor",
    }
    if options.reduce_range:
        info["weights"] += " (7-bit range)"
    if transformer:
        info.update(quantized_op_types=transformer, float_op_types=_float_op_types(out, transformer))
    if tensorrt:
        # evaluate on CPU what TensorRT computes (float ops between Q/DQ), not ORT's integer kernels
        info[ORT_SESSION_CONFIG] = {DISABLE_QDQ_FUSION: "1"}
    elif int8_dot_saturates():
        info["int8_dot_saturates"] = True
        ctx.reporter.log(
            "  note: this CPU has no VNNI; ONNX Runtime's u8·s8 kernels may saturate here (if accuracy drops, "
            "try reduce_range: true, or measure on the deployment CPU)"
        )
    if tensorrt:
        from compress.checks.tensorrt import assert_tensorrt_ready

        assert_tensorrt_ready(str(out), source=f"quantize → {artifact.name}")
        info["tensorrt_rules"] = "passed"
        ctx.reporter.log("  TensorRT Q/DQ rules: passed")
    return StageOutput(file="model.onnx", format="onnx", precision="int8", info=info, target=options.target)


#: what ONNX Runtime's symbolic shape inference leaves in the working directory when it gives up
SHAPE_DEBRIS = "sym_shape_infer_temp.onnx"


def pre_process(src: str, dst: str, **kwargs) -> None:
    """`quant_pre_process`, retried with ONNX's own shape inference when ORT's symbolic one gives up (it does
    on BERT graphs with a dynamic sequence); the debris that failure leaves in the cwd is removed."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    debris = Path.cwd() / SHAPE_DEBRIS
    existed = debris.exists()
    try:
        quant_pre_process(src, dst, **kwargs)
    except Exception as exc:  # a bare Exception("Incomplete symbolic shape inference")
        if kwargs.get("skip_symbolic_shape") or "symbolic shape" not in str(exc):
            raise
        if debris.is_file() and not existed:
            graph = onnx.load(str(debris), load_external_data=False).graph
            for location in {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}:
                (debris.parent / location).unlink(missing_ok=True)
            debris.unlink()
        quant_pre_process(src, dst, **{**kwargs, "skip_symbolic_shape": True})


TRANSFORMER_OPS = frozenset({"LayerNormalization", "Softmax"})  # the graph is a transformer's
TRANSFORMER_QUANTIZED = ["Conv", "Gemm", "MatMul"]  # the ops a transformer gets in INT8
_LAYOUT = ("Shape", "Reshape", "Transpose", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Flatten", "Expand")
_NOT_COMPUTE = frozenset(("QuantizeLinear", "DequantizeLinear", "Constant", "Cast", *_LAYOUT))


def _transformer_op_types(path) -> list[str] | None:  # noqa: ANN001 - a Path
    """MatMul/Gemm/Conv for a transformer's graph; None (every op ORT quantizes) for any other."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return TRANSFORMER_QUANTIZED if any(n.op_type in TRANSFORMER_OPS for n in graph.node) else None


def _float_op_types(path, quantized: list[str]) -> dict[str, int]:  # noqa: ANN001 - a Path
    """{op type: nodes} of the quantized graph's compute nodes left in float (Q/DQ and shape ops aside)."""
    import onnx

    skip = {*_NOT_COMPUTE, *quantized}
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type not in skip:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
