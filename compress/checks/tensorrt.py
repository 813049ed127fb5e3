"""TensorRT-readiness check of an ONNX graph, on CPU, before anyone spends a GPU build on it.

Usage::

    from compress.checks.tensorrt import check_tensorrt, assert_tensorrt_ready
    for v in check_tensorrt("model.int8.onnx"):
        print(v.rule, v.node, v.detail)
    assert_tensorrt_ready("model.int8.onnx", source="runs/x/int8-trt/model.onnx")  # raises StageError

Why a hand-written checker: the only complete judge is TensorRT's own ONNX parser, which needs a CUDA
GPU and the `tensorrt` wheel. These rules restate what its documentation says, so a graph that breaks
them is rejected here, by node name, on any machine:

- TensorRT developer guide, "Working with Quantized Types" / "Explicit Quantization" (TensorRT 10):
  quantization is symmetric and signed (INT8, INT4, FP8, FP4); zero points must be zero; Q/DQ scales are
  build-time constants, a scalar for per-tensor, 1-D for per-channel, same rank as the input for block
  quantization; block quantization is INT4 only; INT4 is weight-only.
- onnx-tensorrt `docs/operators.md` (TensorRT 10.15 matrix, opset 9..24): which ONNX operators the
  parser imports; `DequantizeLinear` accepts INT8/FP8/FP4/INT4 inputs (so an INT32 bias DQ, as ONNX
  Runtime's quantizer writes by default, is refused with "only activation types allowed as input");
  `QLinearConv`, `QLinearMatMul`, `MatMulInteger`, `ConvInteger`, `DynamicQuantizeLinear` and every
  `com.microsoft` contrib op (`MatMulNBits`, ...) are not imported.
- Per-channel weight scales must run along the output-channel axis of the consumer (Conv K = axis 0,
  ConvTranspose axis 1, MatMul B last axis, Gemm B axis 0 with transB=1 else 1): TensorRT fuses the
  scale into the GEMM/convolution epilogue, which is only possible per output channel.
- The project's own floor (ARCHITECTURE.md): opset >= 17, >= 21 where INT4 Q/DQ (`block_size`) is used.

Passing this check does not guarantee the build succeeds (shapes, plugins, memory); failing it
guarantees the build or its precision would be wrong.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compress.errors import StageError

__all__ = [
    "MIN_OPSET",
    "MIN_OPSET_INT4",
    "SUPPORTED_OPS",
    "Violation",
    "assert_tensorrt_ready",
    "check_tensorrt",
]

MIN_OPSET = 17
MIN_OPSET_INT4 = 21

# Operators marked "Y" in the onnx-tensorrt support matrix for TensorRT 10.15 (docs/operators.md).
# Attention, RMSNormalization, RotaryEmbedding and TensorScatter arrived with 10.15's parser (opset 23/24).
_MATRIX_OPS = """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
    CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
    Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
    Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
    LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
    ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN
    RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink
    Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
    Tanh TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
"""
SUPPORTED_OPS: frozenset[str] = frozenset(_MATRIX_OPS.split())

# Default-domain quantized-integer ops that TensorRT does not import, with what to do instead.
_QOPERATOR_OPS = frozenset({"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear"})

_INT4_TYPES = frozenset({TensorProto.INT4, TensorProto.UINT4})
# Quantized types TensorRT's Q/DQ layers take: signed INT8, signed INT4, FP8 E4M3, FP4 E2M1.
_QUANT_TYPES_OK = frozenset(
    {TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN}
    | ({TensorProto.FLOAT4E2M1} if hasattr(TensorProto, "FLOAT4E2M1") else set())
)
# Ops a weight passes through unchanged on its way from DequantizeLinear to its consumer.
_PASS_THROUGH = frozenset({"Identity", "Transpose", "Cast"})
_MODEL_NODE = "<model>"


@dataclass(frozen=True)
class Violation:
    """One reason TensorRT would reject (or silently mis-run) a graph.

    `rule` is a short id: opset, unsupported-op, qdq-type, qdq-zero-point, qdq-scale,
    activation-per-tensor, weight-axis, int4-blocked-weight-only.
    """

    node: str
    op: str
    rule: str
    detail: str

    def __str__(self) -> str:
        where = f"node '{self.node}'" + (f" ({self.op})" if self.op else "")
        return f"[{self.rule}] {where}: {self.detail}"


def check_tensorrt(model: onnx.ModelProto | str | os.PathLike[str]) -> list[Violation]:
    """Every violation of TensorRT 10's ONNX import and explicit-quantization rules, in graph order.

    A path is loaded without its external data (weights of large models stay on disk); the few small
    tensors the rules read (scales, zero points) are read from disk one by one when external.
    """
    base_dir = ""
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        model = onnx.load(str(path), load_external_data=False)
        base_dir = str(path.parent)
    return list(_Checker(model, base_dir).run())


def assert_tensorrt_ready(model: onnx.ModelProto | str | os.PathLike[str], *, source: str = "") -> None:
    """Raise StageError listing every violation (node names, bad values, what TensorRT expects)."""
    violations = check_tensorrt(model)
    if not violations:
        return
    what = source or (str(model) if not isinstance(model, onnx.ModelProto) else "the ONNX model")
    shown = 20
    lines = "\n".join(f"  - {v}" for v in violations[:shown])
    if len(violations) > shown:
        rules = sorted({v.rule for v in violations[shown:]})
        lines += f"\n  ... and {len(violations) - shown} more (rules: {', '.join(rules)})"
    raise StageError(
        f"{what} is not ready for TensorRT: {len(violations)} violation(s) of its ONNX/explicit "
        f"quantization rules:\n{lines}"
    )


def _label(node: onnx.NodeProto, index: int) -> str:
    """The node's name, or a stable stand-in (index and first output) for unnamed nodes."""
    if node.name:
        return node.name
    out = node.output[0] if node.output else ""
    return f"#{index}:{node.op_type}->{out}"


def _type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type) if elem_type else "UNDEFINED"


def _fmt(values: np.ndarray, limit: int = 6) -> str:
    flat = values.reshape(-1)
    head = ", ".join(str(v) for v in flat[:limit].tolist())
    return f"[{head}{', ...' if flat.size > limit else ''}] (shape {list(values.shape)})"


class _Checker:
    """One pass over a model: indexes constants, producers and consumers, then applies each rule."""

    def __init__(self, model: onnx.ModelProto, base_dir: str) -> None:
        self.model = model
        self.base_dir = base_dir
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.const: dict[str, TensorProto] = {}
        self.elem_type: dict[str, int] = {}
        self.producer: dict[str, tuple[onnx.NodeProto, str]] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int, str]]] = {}
        self.uses_int4 = False

    # ---- indexing -------------------------------------------------------------------------------
    def _index_graph(self, graph: onnx.GraphProto, prefix: str = "") -> Iterator[tuple[onnx.NodeProto, str]]:
        """Record constants/types/edges of `graph` and its subgraphs; yield (node, label) in order."""
        for init in graph.initializer:
            self.const[init.name] = init
            self.elem_type[init.name] = init.data_type
        for vi in [*graph.input, *graph.output, *graph.value_info]:
            if vi.type.HasField("tensor_type") and vi.name not in self.elem_type:
                self.elem_type[vi.name] = vi.type.tensor_type.elem_type
        for i, node in enumerate(graph.node):
            label = prefix + _label(node, i)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                tensor = _constant_tensor(node)
                if tensor is not None:
                    self.const[node.output[0]] = tensor
                    self.elem_type[node.output[0]] = tensor.data_type
            for out in node.output:
                self.producer[out] = (node, label)
            for j, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, j, label))
            yield node, label
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for sub in subgraphs:
                    yield from self._index_graph(sub, prefix=f"{label}/")

    def _value(self, name: str) -> np.ndarray | None:
        tensor = self.const.get(name)
        if tensor is None:
            return None
        return numpy_helper.to_array(tensor, self.base_dir)

    def _shape(self, name: str) -> tuple[int, ...] | None:
        tensor = self.const.get(name)
        return None if tensor is None else tuple(tensor.dims)

    def _is_const(self, name: str) -> bool:
        return name in self.const

    # ---- rules ----------------------------------------------------------------------------------
    def run(self) -> Iterator[Violation]:
        nodes = list(self._index_graph(self.model.graph))
        self._scan_int4(nodes)
        yield from self._check_opset()
        for node, label in nodes:
            yield from self._check_op(node, label)
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "QuantizeLinear":
                yield from self._check_quantize(node, label)
            elif node.op_type == "DequantizeLinear":
                yield from self._check_dequantize(node, label)
            elif node.op_type == "Cast" and _attr(node, "to", 0) in _INT4_TYPES:
                yield Violation(
                    label,
                    node.op_type,
                    "int4-blocked-weight-only",
                    f"Cast to {_type_name(_attr(node, 'to', 0))} makes a 4-bit activation; "
                    "TensorRT supports INT4 only as weight-only blocked DequantizeLinear",
                )
        for vi in self.model.graph.input:
            et = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0
            if et in _INT4_TYPES and vi.name not in self.const:
                yield Violation(
                    vi.name,
                    "",
                    "int4-blocked-weight-only",
                    f"graph input '{vi.name}' is {_type_name(et)}: an INT4 activation; TensorRT "
                    "supports INT4 only as weight-only blocked DequantizeLinear",
                )

    def _scan_int4(self, nodes: list[tuple[onnx.NodeProto, str]]) -> None:
        types = set(self.elem_type.values())
        types |= {_attr(n, "output_dtype", 0) for n, _ in nodes if n.op_type == "QuantizeLinear"}
        types |= {_attr(n, "to", 0) for n, _ in nodes if n.op_type == "Cast"}
        self.uses_int4 = bool(types & _INT4_TYPES)

    def _check_opset(self) -> Iterator[Violation]:
        if self.opset < MIN_OPSET:
            yield Violation(
                _MODEL_NODE,
                "",
                "opset",
                f"default-domain opset is {self.opset}; TensorRT explicit quantization "
                f"(per-channel Q/DQ) needs opset >= {MIN_OPSET}: re-export with opset "
                f"{MIN_OPSET} or later",
            )
        elif self.uses_int4 and self.opset < MIN_OPSET_INT4:
            yield Violation(
                _MODEL_NODE,
                "",
                "opset",
                f"the graph uses INT4 tensors at opset {self.opset}; INT4 and blocked "
                f"DequantizeLinear (block_size) need opset >= {MIN_OPSET_INT4}",
            )

    def _check_op(self, node: onnx.NodeProto, label: str) -> Iterator[Violation]:
        func = self.functions.get((node.domain, node.op_type))
        if func is not None:  # a model-local function: onnx-tensorrt imports its body, so check that
            for i, inner in enumerate(func.node):
                yield from self._check_op(inner, f"{label}/{_label(inner, i)}")
            return
        if node.domain == "com.microsoft":
            yield Violation(
                label,
                node.op_type,
                "unsupported-op",
                f"com.microsoft contrib op {node.op_type} is an ONNX Runtime extension that "
                "TensorRT's parser does not import; quantize with `target: tensorrt` (standard "
                "QuantizeLinear/DequantizeLinear, INT4 as blocked DequantizeLinear) instead",
            )
        elif node.domain not in ("", "ai.onnx"):
            yield Violation(
                label,
                node.op_type,
                "unsupported-op",
                f"custom-domain op {node.domain}::{node.op_type} needs a TensorRT plugin; "
                "export it with standard ONNX ops",
            )
        elif node.op_type in _QOPERATOR_OPS:
            yield Violation(
                label,
                node.op_type,
                "unsupported-op",
                f"{node.op_type} (ONNX Runtime QOperator format) is not imported by TensorRT; "
                "quantize with `target: tensorrt` (QDQ format, symmetric INT8)",
            )
        elif node.op_type not in SUPPORTED_OPS:
            yield Violation(
                label,
                node.op_type,
                "unsupported-op",
                f"{node.op_type} is not in TensorRT 10's ONNX operator support matrix",
            )

    # -- Q/DQ shared parts
    def _check_zero_point(self, node: onnx.NodeProto, label: str, qtype: int) -> Iterator[Violation]:
        if len(node.input) < 3 or not node.input[2]:
            return
        zp_name = node.input[2]
        if not self._is_const(zp_name):
            yield Violation(
                label,
                node.op_type,
                "qdq-zero-point",
                f"zero point '{zp_name}' is computed at run time; TensorRT needs a constant "
                "all-zero zero point (or none)",
            )
            return
        zp = self._value(zp_name)
        if zp is not None and np.any(zp.astype(np.float64) != 0):
            yield Violation(
                label,
                node.op_type,
                "qdq-zero-point",
                f"zero point '{zp_name}' = {_fmt(zp)} ({_type_name(qtype)}); TensorRT supports "
                "only symmetric quantization: zero point 0 of a signed type (INT8/INT4); "
                "calibrate with ActivationSymmetric/WeightSymmetric and QInt8",
            )

    def _scale_shape(self, node: onnx.NodeProto) -> tuple[int, ...] | None:
        """Shape of a constant scale, or None when the scale is not a constant (reported separately)."""
        return self._shape(node.input[1]) if len(node.input) > 1 else None

    def _scale_violations(self, node: onnx.NodeProto, label: str) -> Iterator[Violation]:
        scale_name = node.input[1] if len(node.input) > 1 else ""
        if not self._is_const(scale_name):
            yield Violation(
                label,
                node.op_type,
                "qdq-scale",
                f"scale '{scale_name}' is not a constant; TensorRT needs build-time constant Q/DQ scales",
            )
            return
        scale = self._value(scale_name)
        if scale is not None and (scale.size == 0 or np.any(~(scale.astype(np.float64) > 0))):
            yield Violation(
                label,
                node.op_type,
                "qdq-scale",
                f"scale '{scale_name}' = {_fmt(scale)}; TensorRT needs strictly positive scales",
            )

    def _type_violation(self, node: onnx.NodeProto, label: str, qtype: int, role: str) -> Iterator[Violation]:
        if qtype in _QUANT_TYPES_OK or qtype == TensorProto.UINT4:
            return  # UINT4 is reported by the INT4 rule with its own advice
        hint = ""
        if qtype == TensorProto.UINT8:
            hint = "; use QuantType.QInt8 (TensorRT supports only signed, symmetric quantization)"
        elif qtype == TensorProto.INT32 and node.op_type == "DequantizeLinear":
            hint = (
                "; an INT32 DequantizeLinear is a quantized bias: keep biases in float "
                "(onnxruntime quantize_static extra_options={'QuantizeBias': False})"
            )
        yield Violation(
            label,
            node.op_type,
            "qdq-type",
            f"{role} is {_type_name(qtype)}; TensorRT Q/DQ accepts INT8, INT4 (weights), FP8 E4M3 and FP4 E2M1{hint}",
        )

    # -- QuantizeLinear
    def _quantize_type(self, node: onnx.NodeProto) -> int:
        out_dtype = _attr(node, "output_dtype", 0)
        if out_dtype:
            return out_dtype
        if len(node.input) > 2 and node.input[2]:
            return self.elem_type.get(node.input[2], 0)
        return TensorProto.UINT8  # ONNX default when neither zero point nor output_dtype is given

    def _check_quantize(self, node: onnx.NodeProto, label: str) -> Iterator[Violation]:
        qtype = self._quantize_type(node)
        if qtype in _INT4_TYPES:
            yield Violation(
                label,
                node.op_type,
                "int4-blocked-weight-only",
                f"QuantizeLinear to {_type_name(qtype)}: TensorRT supports INT4 only for "
                "weights, stored pre-quantized and read by a blocked DequantizeLinear "
                "(weight-only); do not quantize to INT4 in the graph",
            )
        else:
            yield from self._type_violation(node, label, qtype, "QuantizeLinear output type")
        yield from self._check_zero_point(node, label, qtype)
        yield from self._scale_violations(node, label)
        x = node.input[0]
        if not self._is_const(x):
            yield from self._per_tensor_only(node, label, f"activation '{x}'")
        # A QuantizeLinear of a constant weight is judged at its DequantizeLinear (axis, consumers).

    # -- DequantizeLinear
    def _dequantize_type(self, node: onnx.NodeProto) -> int:
        x = node.input[0]
        if x in self.elem_type and self.elem_type[x]:
            return self.elem_type[x]
        prod = self.producer.get(x)
        if prod is not None and prod[0].op_type == "QuantizeLinear":
            return self._quantize_type(prod[0])
        if len(node.input) > 2 and node.input[2]:
            return self.elem_type.get(node.input[2], 0)
        return 0

    def _weight_source(self, name: str) -> bool:
        """True when `name` is a constant, or the output of a QuantizeLinear of a constant (Q/DQ on W)."""
        if self._is_const(name):
            return True
        prod = self.producer.get(name)
        return bool(prod and prod[0].op_type == "QuantizeLinear" and self._is_const(prod[0].input[0]))

    def _check_dequantize(self, node: onnx.NodeProto, label: str) -> Iterator[Violation]:
        qtype = self._dequantize_type(node)
        x = node.input[0]
        is_weight = self._weight_source(x)
        if qtype in _INT4_TYPES:
            yield from self._check_int4_dq(node, label, qtype, is_weight)
        elif qtype:
            yield from self._type_violation(node, label, qtype, f"input '{x}'")
        yield from self._check_zero_point(node, label, qtype)
        yield from self._scale_violations(node, label)
        if not is_weight:
            yield from self._per_tensor_only(node, label, f"activation '{x}'")
        elif qtype not in _INT4_TYPES and _attr(node, "block_size", 0) == 0:
            yield from self._check_weight_axis(node, label, node.output[0])
        elif qtype not in _INT4_TYPES:
            yield Violation(
                label,
                node.op_type,
                "int4-blocked-weight-only",
                f"block quantization (block_size={_attr(node, 'block_size', 0)}) on "
                f"{_type_name(qtype)}; TensorRT supports block quantization for INT4 only",
            )

    def _check_int4_dq(self, node: onnx.NodeProto, label: str, qtype: int, is_weight: bool) -> Iterator[Violation]:
        problems = []
        if qtype == TensorProto.UINT4:
            problems.append("input is UINT4; TensorRT INT4 is signed (INT4, zero point 0)")
        if not self._is_const(node.input[0]):
            problems.append(
                f"input '{node.input[0]}' is not an initializer (INT4 is weight-only: the "
                "packed INT4 weight must be stored in the graph)"
                if is_weight
                else f"input '{node.input[0]}' is an INT4 activation; INT4 is weight-only"
            )
        block = _attr(node, "block_size", 0)
        if block <= 0:
            problems.append(
                "no block_size attribute: TensorRT INT4 weights must be block-quantized "
                "(opset >= 21 DequantizeLinear with block_size, e.g. 128)"
            )
        else:
            xs, ss = self._shape(node.input[0]), self._shape(node.input[1])
            if xs is not None and ss is not None and len(xs) != len(ss):
                problems.append(
                    f"blocked scale has rank {len(ss)} but the weight has rank {len(xs)}; "
                    "a block scale has the weight's rank"
                )
        consumers = self._final_consumers(node.output[0])
        bad = sorted({f"{c.op_type} '{lab}'" for c, _, _, lab in consumers if c.op_type not in ("MatMul", "Gemm")})
        if bad:
            problems.append(f"feeds {', '.join(bad)}; TensorRT INT4 weight-only quantization feeds MatMul/Gemm only")
        for p in problems:
            yield Violation(label, node.op_type, "int4-blocked-weight-only", p)

    def _per_tensor_only(self, node: onnx.NodeProto, label: str, what: str) -> Iterator[Violation]:
        shape = self._scale_shape(node)
        if shape is not None and int(np.prod(shape, dtype=np.int64)) != 1:
            yield Violation(
                label,
                node.op_type,
                "activation-per-tensor",
                f"{what} has a scale of shape {list(shape)}; TensorRT quantizes activations "
                "per-tensor only (one scalar scale)",
            )
        elif _attr(node, "block_size", 0):
            yield Violation(
                label,
                node.op_type,
                "activation-per-tensor",
                f"{what} is block-quantized; TensorRT quantizes activations per-tensor only",
            )

    # -- per-channel weights
    def _final_consumers(
        self, name: str, axis_map: tuple[int, ...] | None = None
    ) -> list[tuple[onnx.NodeProto, int, tuple[int, ...] | None, str]]:
        """Consumers of `name` past Identity/Cast/Transpose; each with the Transpose-composed axis map.

        The map sends an axis of the original weight to its position in the consumer's input (None when
        the path changed the rank or layout in a way the rule cannot follow, e.g. Reshape).
        """
        out = []
        for node, j, label in self.consumers.get(name, []):
            if node.op_type in _PASS_THROUGH and j == 0:
                amap = axis_map
                if node.op_type == "Transpose" and amap is not None:
                    perm = _attr(node, "perm", None)
                    amap = None if perm is None else tuple(list(perm).index(a) for a in amap)
                out.extend(self._final_consumers(node.output[0], amap))
            else:
                out.append((node, j, axis_map, label))
        return out

    def _check_weight_axis(self, node: onnx.NodeProto, label: str, out_name: str) -> Iterator[Violation]:
        shape = self._scale_shape(node)
        if shape is None or int(np.prod(shape, dtype=np.int64)) == 1:
            return  # per-tensor weights are always allowed
        wshape = self._shape(node.input[0])
        if wshape is None:
            prod = self.producer.get(node.input[0])
            wshape = self._shape(prod[0].input[0]) if prod else None
        if wshape is None:
            return
        rank = len(wshape)
        axis = _attr(node, "axis", 1)
        axis = axis + rank if axis < 0 else axis
        if len(shape) != 1:
            yield Violation(
                label,
                node.op_type,
                "weight-axis",
                f"per-channel scale has shape {list(shape)}; TensorRT needs a 1-D scale for "
                "per-channel INT8 (block scales are for INT4 only)",
            )
            return
        consumers = self._final_consumers(out_name, tuple(range(rank)))
        for consumer, j, amap, clabel in consumers:
            if amap is None:
                continue
            expected = _expected_axis(consumer, j, len(amap))
            if expected is None:
                continue
            got = amap[axis]
            if got != expected:
                yield Violation(
                    label,
                    node.op_type,
                    "weight-axis",
                    f"per-channel weight axis {axis} (shape {list(wshape)}) lands on axis {got} "
                    f"of {consumer.op_type} '{clabel}' input {j}; TensorRT needs the output-"
                    f"channel axis {expected} there ({_axis_reason(consumer, j)})",
                )


def _expected_axis(consumer: onnx.NodeProto, input_index: int, rank: int) -> int | None:
    """Output-channel axis of a weight at `input_index` of `consumer`, or None when not constrained."""
    op = consumer.op_type
    if op == "Conv" and input_index == 1:
        return 0
    if op == "ConvTranspose" and input_index == 1:
        return 1
    if op == "MatMul" and input_index == 1:
        return rank - 1
    if op == "MatMul" and input_index == 0 and rank >= 2:
        return rank - 2
    if op == "Gemm" and input_index == 1:
        return 0 if _attr(consumer, "transB", 0) else 1
    if op == "Gemm" and input_index == 0:
        return 1 if _attr(consumer, "transA", 0) else 0
    return None


def _axis_reason(consumer: onnx.NodeProto, input_index: int) -> str:
    op = consumer.op_type
    if op == "Conv":
        return "Conv weight (K, C/g, kH, kW): axis 0"
    if op == "ConvTranspose":
        return "ConvTranspose weight (C, K/g, kH, kW): axis 1"
    if op == "MatMul":
        return "MatMul B (..., K, N): last axis" if input_index == 1 else "MatMul A (..., M, K): axis -2"
    if op == "Gemm":
        return f"Gemm transB={_attr(consumer, 'transB', 0)}"
    return op


def _attr(node: onnx.NodeProto, name: str, default):  # noqa: ANN001, ANN202 - attribute values vary
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The value of a Constant node as a TensorProto (value, value_float(s), value_int(s))."""
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name == "value_float":
            return numpy_helper.from_array(np.array(a.f, dtype=np.float32))
        if a.name == "value_floats":
            return numpy_helper.from_array(np.array(list(a.floats), dtype=np.float32))
        if a.name == "value_int":
            return numpy_helper.from_array(np.array(a.i, dtype=np.int64))
        if a.name == "value_ints":
            return numpy_helper.from_array(np.array(list(a.ints), dtype=np.int64))
    return None
