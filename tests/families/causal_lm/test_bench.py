"""The decoder benchmark runs ONNX Runtime and torch sessions through one protocol and gives sane figures."""

from __future__ import annotations

import numpy as np

from compress.bench.decoder import bench_decoder, file_bytes, onnx_weight_bytes, torch_weight_bytes
from compress.bench.harness import copy_bandwidth_gbs
from compress.families.causal_lm.sessions import OrtCausalLM, TorchCausalLM


def test_torch_session_matches_ort_session(exported):
    model, path = exported
    ids = np.array([[5, 6, 7, 8]])
    t_logits, t_state = TorchCausalLM(model).prefill(ids)
    o_logits, o_state = OrtCausalLM(path).prefill(ids)
    np.testing.assert_allclose(t_logits, o_logits, atol=1e-4)  # FP32 rounding only
    step = np.array([[9]])
    np.testing.assert_allclose(
        TorchCausalLM(model).decode(step, t_state)[0], OrtCausalLM(path).decode(step, o_state)[0], atol=1e-4
    )
    # the greedy continuation of both sessions (torch: its own cache, ONNX Runtime: prefill/decode)
    assert TorchCausalLM(model).continue_greedy([5, 6, 7], 8) == OrtCausalLM(path).continue_greedy([5, 6, 7], 8)


def test_bench_figures(exported):
    model, path = exported
    kw = {
        "prompt_lengths": (8, 16),
        "batch_sizes": (1, 2),
        "decode_context": 8,
        "decode_tokens": 4,
        "warmup": 1,
        "iterations": 2,
        "bandwidth_gbs": copy_bandwidth_gbs(size_mb=16, repeats=2),
    }
    ort = bench_decoder(
        OrtCausalLM(path, threads=1),
        vocab_size=1000,
        weight_bytes=onnx_weight_bytes(path),
        size_bytes=file_bytes(path),
        threads=1,
        **kw,
    )
    torch = bench_decoder(
        TorchCausalLM(model, threads=1),
        vocab_size=1000,
        weight_bytes=torch_weight_bytes(model),
        size_bytes=torch_weight_bytes(model, decode_only=False),
        threads=1,
        **kw,
    )
    assert (ort.backend, torch.backend) == ("onnxruntime", "torch")
    for res in (ort, torch):
        assert set(res.prefill_ms) == {8, 16} and set(res.decode_tokens_per_s) == {1, 2}
        assert all(v > 0 for v in res.prefill_ms.values())
        assert res.decode_tokens_per_s[2] == 2e3 / res.decode_step_ms[2]
        assert res.peak_rss_mb > 10 and res.bandwidth_gbs == kw["bandwidth_gbs"]
        assert res.decode_bound_ms == res.weight_mb * 1e6 / (res.bandwidth_gbs * 1e9) * 1e3
    assert onnx_weight_bytes(path, decode_only=False) <= path.stat().st_size
    # Untied: the (1000, 64) fp32 embedding table is read one row per token, so it is left out.
    table = 1000 * 64 * 4
    skipped = onnx_weight_bytes(path, decode_only=False) - onnx_weight_bytes(path)
    assert skipped == (0 if model.config.tie_word_embeddings else table)
    assert torch_weight_bytes(model, decode_only=False) - torch_weight_bytes(model) == skipped


def test_memcpy_bandwidth_positive():
    assert 0.1 < copy_bandwidth_gbs(size_mb=16, repeats=2) < 10_000
