"""Perplexity, top-1 agreement and greedy match on models whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from compress.llm.generate import OrtCausalLM
from compress.llm.metrics import (
    greedy_from_logits,
    greedy_match,
    perplexity,
    top1_agreement,
    torch_logits_fn,
)

V = 50
WINDOWS = np.random.default_rng(0).integers(0, V, size=(5, 12))


def uniform(ids: np.ndarray) -> np.ndarray:
    return np.zeros((*ids.shape, V), dtype=np.float32)


def oracle_for(windows: np.ndarray):
    """Puts +30 on the true next token of every window it has seen: p(next) = 1 - ~(V-1)e-30."""
    table = {tuple(w[:-1]): w for w in windows}

    def fn(ids: np.ndarray) -> np.ndarray:
        out = np.zeros((*ids.shape, V), dtype=np.float32)
        for b, row in enumerate(ids):
            full = table[tuple(row[:-1])]
            out[b, np.arange(len(row) - 1), full[1:]] = 30.0
        return out

    return fn


def test_uniform_model_perplexity_is_vocab_size():
    res = perplexity(uniform, WINDOWS, batch_size=2)
    # log-softmax of equal logits is exactly -log V; 1e-3 relative is the brief's tolerance.
    assert res.perplexity == pytest.approx(V, rel=1e-3)
    assert res.tokens == 5 * 11 and res.windows == 5


def test_always_right_model_perplexity_is_one():
    res = perplexity(oracle_for(WINDOWS), WINDOWS, batch_size=3)
    assert res.perplexity == pytest.approx(1.0, abs=1e-6)


def test_top1_agreement_and_greedy_match():
    assert top1_agreement(uniform, uniform, WINDOWS) == 1.0
    oracle = oracle_for(WINDOWS)
    agree = top1_agreement(uniform, oracle, WINDOWS)
    # uniform argmax is token 0; the oracle's argmax is the next token (last position: 0 for both)
    expect = np.mean(np.concatenate([WINDOWS[:, 1:] == 0, np.ones((5, 1), bool)], axis=1))
    assert agree == pytest.approx(expect)

    def gen_a(prompt, n):
        return [1, 2, 3, 4][:n]

    def gen_b(prompt, n):
        return [1, 2, 9, 4][:n] if prompt[0] == 0 else [1, 2, 3, 4][:n]

    match = greedy_match(gen_a, gen_b, [[0], [1]], 4)
    assert match.first_divergence == (2, None) and match.identical == 0.5
    assert match.mean_matched_tokens == 3.0


def test_ort_and_torch_perplexity_agree(exported):
    model, path = exported
    windows = np.random.default_rng(1).integers(0, 1000, size=(3, 16))
    p_torch = perplexity(torch_logits_fn(model), windows).perplexity
    p_ort = perplexity(OrtCausalLM(path).logits, windows, batch_size=3).perplexity
    # Same FP32 model in two runtimes: logits agree to ~1e-6, so ppl to far better than 1e-4 relative.
    assert p_ort == pytest.approx(p_torch, rel=1e-4)
    lm = OrtCausalLM(path)
    expect = greedy_from_logits(torch_logits_fn(model), [5, 6, 7], 8)
    assert greedy_from_logits(lm.logits, [5, 6, 7], 8) == expect


def test_bad_windows_raise():
    with pytest.raises(ValueError, match="T >= 2"):
        perplexity(uniform, np.zeros((3, 1), dtype=np.int64))
