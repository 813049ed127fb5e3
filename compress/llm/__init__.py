"""Decoder-LLM library layer: model sources, text data, metrics, ONNX export with KV cache, ONNX Runtime
generation, INT8 for the decoder and benchmarks. The `causal-lm` adapter and stages call into here.

Modules import torch/transformers/onnxruntime lazily where they can, so `import compress.llm` stays light.
"""
