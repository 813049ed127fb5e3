"""Perplexity, top-1 agreement and greedy match on models whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from compress.families.causal_lm.sessions import OrtCausalLM, TorchCausalLM
from compress.families.causal_lm.task import greedy_match, perplexity, top1_agreement

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
    assert (res.predictions == 0).all()  # argmax of equal logits is the first token


def test_always_right_model_perplexity_is_one():
    res = perplexity(oracle_for(WINDOWS), WINDOWS, batch_size=3)
    assert res.perplexity == pytest.approx(1.0, abs=1e-6)


def test_top1_agreement_and_greedy_match():
    flat = perplexity(uniform, WINDOWS).predictions
    assert top1_agreement(flat, flat) == 1.0
    agree = top1_agreement(flat, perplexity(oracle_for(WINDOWS), WINDOWS).predictions)
    # uniform argmax is token 0; the oracle's argmax is the next token; the last position has none to score
    assert agree == pytest.approx(np.mean(WINDOWS[:, 1:] == 0))

    match = greedy_match([[1, 2, 3, 4], [1, 2, 3, 4]], [[1, 2, 9, 4], [1, 2, 3, 4]], 4)
    assert match.first_divergence == (2, None) and match.identical == 0.5
    assert match.mean_matched_tokens == 3.0


def test_ort_and_torch_perplexity_agree(exported):
    model, path = exported
    windows = np.random.default_rng(1).integers(0, 1000, size=(3, 16))
    p_torch = perplexity(TorchCausalLM(model).logits, windows).perplexity
    p_ort = perplexity(OrtCausalLM(path).logits, windows, batch_size=3).perplexity
    # Same FP32 model in two runtimes: logits agree to ~1e-6, so ppl to far better than 1e-4 relative.
    assert p_ort == pytest.approx(p_torch, rel=1e-4)


def test_greedy_continuation_matches_a_no_cache_reference(exported):
    """Both sessions' cached greedy loops give the tokens of re-running the whole sequence each step."""
    model, path = exported
    torch_lm, seq = TorchCausalLM(model), [5, 6, 7]
    for _ in range(8):
        seq.append(int(torch_lm.logits(np.asarray([seq]))[0, -1].argmax()))
    assert torch_lm.continue_greedy([5, 6, 7], 8) == seq[3:]
    assert OrtCausalLM(path).continue_greedy([5, 6, 7], 8) == seq[3:]


def test_bad_windows_raise():
    with pytest.raises(ValueError, match="T >= 2"):
        perplexity(uniform, np.zeros((3, 1), dtype=np.int64))
