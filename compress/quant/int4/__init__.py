"""INT4 (and 8-bit override) weight-only quantization: RTN, GPTQ, AWQ, packing, ONNX rewrite, GPTQ I/O.

Typical flow (what the `quantize` stage with ``precision: int4`` calls)::

    qws = gptq_quantize_model(model, batches, config=GPTQConfig(group_size=128))  # or awq_/rtn_
    # export `model` to ONNX (opset >= 18; 21 for target tensorrt), then:
    report = rewrite_onnx_file("fp32.onnx", "int4.onnx", qws, float_weights_of(model, qws))
"""

from compress.quant.int4.awq import AWQConfig, awq_quantize_model
from compress.quant.int4.checkpoint import read_gptq_checkpoint, write_gptq_checkpoint
from compress.quant.int4.gptq import GPTQConfig, gptq_quantize_model, gptq_quantize_weight
from compress.quant.int4.model import float_weights_of, rtn_quantize_model
from compress.quant.int4.onnx_rewrite import RewriteReport, quantize_onnx_weights, rewrite_onnx_file
from compress.quant.int4.rtn import rtn_quantize
from compress.quant.int4.weight import QuantizedWeight, WeightQuantConfig

__all__ = [
    "AWQConfig",
    "GPTQConfig",
    "QuantizedWeight",
    "RewriteReport",
    "WeightQuantConfig",
    "awq_quantize_model",
    "float_weights_of",
    "gptq_quantize_model",
    "gptq_quantize_weight",
    "quantize_onnx_weights",
    "read_gptq_checkpoint",
    "rewrite_onnx_file",
    "rtn_quantize",
    "rtn_quantize_model",
    "write_gptq_checkpoint",
]
