"""Decoder-LLM library layer; the `causal-lm` adapter and stages call into it.

- ``sources``: ``load_causal_lm("hf:|gguf:|pkg:|python:...")``, ``source_fingerprint``.
- ``text_data``: pydoc / text / JSONL text, fixed token windows, non-overlapping eval/calibration split.
- ``metrics``: perplexity, top-1 agreement, greedy match over any ``logits_fn``.
- ``onnx_export``: KV-cache ONNX export, ``describe_io``, ``check_parity``.
- ``generate``: ``OrtCausalLM`` (ONNX Runtime prefill/decode, sampling options).
- ``bench``: prefill / TTFT / decode tokens/s / RSS / size / bandwidth bound, ORT and torch.

Submodules import torch, transformers and onnxruntime lazily where they can; this package imports nothing.
"""
