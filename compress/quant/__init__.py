"""Quantization math and formats that the `quantize` stage calls (torch side; ONNX rewriting in `int4`).

Importing this package is light: it pulls in nothing beyond torch/numpy until a submodule is used.
"""
