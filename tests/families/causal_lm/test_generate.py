"""ONNX Runtime generation: equals HF greedy, padding-invariant, and each sampling option behaves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compress.families.causal_lm.generate import GenerationOptions, generate, next_tokens
from compress.families.causal_lm.sessions import OrtCausalLM

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]


@pytest.fixture(scope="module")
def lm(untied_onnx):
    return OrtCausalLM(untied_onnx[1], threads=1)


def test_greedy_equals_hf_generate(untied_onnx, lm):
    model, _ = untied_onnx
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([PROMPTS[0]]), max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    got = generate(lm, [PROMPTS[0]], GenerationOptions(max_new_tokens=16)).tokens[0]
    assert got == ref[0, len(PROMPTS[0]) :].tolist()


def test_left_padded_batch_equals_one_by_one(lm):
    opts = GenerationOptions(max_new_tokens=12)
    batch = generate(lm, PROMPTS, opts).tokens
    assert batch == [generate(lm, [p], opts).tokens[0] for p in PROMPTS]


def test_io_binding_and_numpy_paths_agree(untied_onnx, lm):
    plain = OrtCausalLM(untied_onnx[1], threads=1, io_binding=False)
    opts = GenerationOptions(max_new_tokens=10)
    assert generate(plain, PROMPTS, opts).tokens == generate(lm, PROMPTS, opts).tokens


def test_top_k_1_sampling_equals_greedy(lm):
    greedy = generate(lm, PROMPTS, GenerationOptions(max_new_tokens=10)).tokens
    sampled = generate(
        lm, PROMPTS, GenerationOptions(max_new_tokens=10, do_sample=True, top_k=1, temperature=0.7, seed=3)
    ).tokens
    assert sampled == greedy


def test_seed_reproducible_and_different_seeds_differ(lm):
    def run(seed: int) -> list[list[int]]:
        return generate(lm, PROMPTS, GenerationOptions(max_new_tokens=16, do_sample=True, seed=seed)).tokens

    assert run(7) == run(7)
    # 3 x 16 draws over ~1000 nearly-uniform tokens: equal outputs for two seeds would be a broken sampler.
    assert run(7) != run(8)


def test_repetition_penalty_changes_output_deterministically(lm):
    base = generate(lm, PROMPTS, GenerationOptions(max_new_tokens=16)).tokens
    pen = GenerationOptions(max_new_tokens=16, repetition_penalty=3.0)
    first, second = generate(lm, PROMPTS, pen).tokens, generate(lm, PROMPTS, pen).tokens
    assert first == second and first != base

    # The untied toy model repeats under greedy; a strong penalty must reduce repeats.
    def repeats(rows):
        return sum(len(r) - len(set(r)) for r in rows)

    assert repeats(first) < repeats(base)


def test_stop_token_stops_row(lm):
    greedy = generate(lm, PROMPTS, GenerationOptions(max_new_tokens=12)).tokens
    stop = greedy[0][2]
    cut = greedy[0].index(stop) + 1
    res = generate(lm, PROMPTS, GenerationOptions(max_new_tokens=12, stop_token_ids=(stop,)))
    assert res.tokens[0] == greedy[0][:cut] and res.finish_reasons[0] == "stop"
    for row, ref, reason in zip(res.tokens[1:], greedy[1:], res.finish_reasons[1:], strict=True):
        expect = ref[: ref.index(stop) + 1] if stop in ref else ref
        assert row == expect and reason == ("stop" if stop in ref else "length")


def test_top_p_keeps_smallest_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    opts = GenerationOptions(do_sample=True, top_p=0.7)
    rng = np.random.default_rng(0)
    draws = {int(next_tokens(logits, np.zeros_like(logits, bool), opts, rng)[0]) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 needs the second token; 0.5 + 0.3 >= 0.7 stops there


def test_repetition_penalty_formula():
    logits = np.array([[2.0, -2.0, 1.0]])
    seen = np.array([[True, True, False]])
    opts = GenerationOptions(repetition_penalty=4.0)
    # CTRL rule: positive seen logits divided (2 -> 0.5), negative multiplied (-2 -> -8): token 2 wins.
    assert next_tokens(logits, seen, opts, np.random.default_rng(0))[0] == 2
