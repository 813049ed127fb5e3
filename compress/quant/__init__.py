"""Quantization the `quantize` stage composes: a scheme, an algorithm and a target, each defined once.

- `vocab`: the names (precisions, targets, INT4 algorithms, INT8 methods); `scheme`: the group-size rule.
- `algorithms/`: rtn, gptq, awq, checkpoint (torch side) and the INT8 MatMul methods (ONNX side), each
  with an options model registered by name.
- `targets/`: onnxruntime-cpu and tensorrt (their Q/DQ flavour, session settings), and the INT4 ONNX
  rewrite (`onnx_rewrite`).
- `primitives/`: qparams, packing and the quantized-weight record (pure tensor math).

Importing this package (and `vocab`, `scheme`, `algorithms`, `targets`) pulls in only pydantic; the
submodules that compute import torch / onnx.
"""
