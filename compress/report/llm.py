"""The numbers behind the causal-lm pictures: where greedy continuations diverge, a failure card, and the
per-window perplexity plot. Continuations are greedy (the evaluation decodes greedily; presets are not here)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from compress.report.figures import plain_log_ticks, png_bytes, pyplot

REPEAT_NGRAM, REPEAT_TIMES = 4, 3  # a repetition loop: some 4-gram of tokens occurs 3 times or more


def first_divergence(tokens: Sequence[int], reference: Sequence[int]) -> int | None:
    """Index of the first token that differs from `reference` (or where one ends first); None if identical."""
    for i, (a, b) in enumerate(zip(tokens, reference, strict=False)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def has_repetition_loop(tokens: Sequence[int], n: int = REPEAT_NGRAM, times: int = REPEAT_TIMES) -> bool:
    counts: dict[tuple[int, ...], int] = {}
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= times:
            return True
    return False


def _non_text(text: str) -> bool:
    """U+FFFD (bytes that are not UTF-8) or control characters other than whitespace."""
    return any(ch == "\ufffd" or (ord(ch) < 32 and ch not in "\n\t\r") for ch in text)


def failure_card(continuations: Sequence[Sequence[int]], texts: Sequence[str], expected: int) -> dict[str, int]:
    """Per artifact: prompts whose continuation loops, is empty, stops short of `expected` tokens, or holds
    non-text bytes."""
    return {
        "prompts": len(continuations),
        "repetition loop": sum(has_repetition_loop(c) for c in continuations),
        "empty": sum(len(c) == 0 or not t.strip() for c, t in zip(continuations, texts, strict=True)),
        "truncated": sum(0 < len(c) < expected for c in continuations),
        "non-text bytes": sum(_non_text(t) for t in texts),
    }


def window_ppl_figure(window_nll: Mapping[str, np.ndarray]) -> bytes:
    """Perplexity of every evaluation window, one line per artifact."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    for name, nll in window_nll.items():
        ax.plot(np.arange(len(nll)), np.exp(nll), marker="o", ms=3, label=name)
    ax.set_xlabel("evaluation window")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return png_bytes(fig)
