"""The quantization vocabulary, written once: precisions, targets, INT4 algorithms, INT8 methods.

Config, stages, adapters and checks import these names; the registries in `compress.quant.algorithms` and
`compress.quant.targets` refuse at import an entry whose name is not listed here (and a test checks the
converse), so a name cannot be spelt two ways.
"""

from __future__ import annotations

from typing import Literal, get_args

Precision = Literal["fp32", "fp16", "bf16", "int8", "int4"]
FloatPrecision = Literal["fp32", "fp16", "bf16"]
QuantPrecision = Literal["int8", "int4"]
#: where a quantized ONNX graph is meant to run (onnxruntime-genai: its model builder's fused decoder, int4)
Target = Literal["onnxruntime-cpu", "tensorrt", "onnxruntime-genai"]
#: torch-side weight-only algorithms of `precision: int4`
Int4Algorithm = Literal["rtn", "gptq", "awq", "autoround", "checkpoint"]
#: methods of `precision: int8` (`auto` asks the family: `Adapter.default_int8_method`); smoothquant starts
#: from the torch model (its scales are folded there), the others from ONNX
Int8Method = Literal["static", "weight-only", "dynamic", "smoothquant"]
#: dynamic W8A8 activation scales: one per tensor (ONNX Runtime's DynamicQuantizeLinear) or one per token
Activations = Literal["tensor", "token"]
#: `method: auto` of `precision: int8`: the family's default INT8 method
AUTO = "auto"
#: the output projection (and a tied embedding): left float or quantized at 8 / 4 bits
LmHead = Literal["float", "int8", "int4"]

PRECISIONS: tuple[str, ...] = get_args(Precision)
FLOAT_PRECISIONS: frozenset[str] = frozenset(get_args(FloatPrecision))
QUANT_PRECISIONS: tuple[str, ...] = get_args(QuantPrecision)
TARGETS: tuple[str, ...] = get_args(Target)
INT4_ALGORITHMS: tuple[str, ...] = get_args(Int4Algorithm)
INT8_METHODS: tuple[str, ...] = get_args(Int8Method)
LM_HEAD: tuple[str, ...] = get_args(LmHead)
ACTIVATIONS: tuple[str, ...] = get_args(Activations)
