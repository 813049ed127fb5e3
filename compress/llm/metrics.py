"""Quality metrics of a causal LM that work for any backend through a ``logits_fn``.

``logits_fn(input_ids: np.ndarray (B, T) int64) -> np.ndarray (B, T, V)``: a torch model, an
:class:`~compress.llm.generate.OrtCausalLM` (``lm.logits``) or anything else, so the number gated on is
the number of the file shipped.

- :func:`perplexity`: exp of the mean next-token negative log-likelihood over non-overlapping windows
  (each window is scored on its own, no stride overlap: the standard "fixed-length, non-overlapping"
  evaluation of the HF perplexity guide; it reads a little higher than sliding-window perplexity).
- :func:`top1_agreement`: share of positions where two models pick the same next token.
- :func:`greedy_match`: greedy continuations of prompts and the first position where they diverge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

LogitsFn = Callable[[np.ndarray], np.ndarray]
GenerateFn = Callable[[list[int], int], list[int]]


def torch_logits_fn(model: object) -> LogitsFn:
    """Wrap a transformers causal LM as a ``logits_fn`` (no grad, float32 numpy out)."""
    import torch

    def fn(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(np.asarray(ids, dtype=np.int64)), use_cache=False)
        return out.logits.float().numpy()

    return fn


def _batches(windows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (N, T) with T >= 2 tokens; got shape {windows.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    return [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]


def _token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood (B, T-1) of each next token, computed in float64 for stability."""
    pred = logits[:, :-1].astype(np.float64)  # (B, T-1, V)
    target = ids[:, 1:]  # (B, T-1)
    peak = pred.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(pred - peak).sum(axis=-1)) + peak[..., 0]  # (B, T-1)
    chosen = np.take_along_axis(pred, target[..., None], axis=-1)[..., 0]  # (B, T-1)
    return lse - chosen


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens: int
    windows: int


def perplexity(logits_fn: LogitsFn, windows: np.ndarray, *, batch_size: int = 1) -> PerplexityResult:
    """Perplexity over windows (N, T): every window predicts its tokens 1..T-1 from the ones before."""
    total, count = 0.0, 0
    for batch in _batches(windows, batch_size):
        logits = np.asarray(logits_fn(batch))
        if logits.shape[:2] != batch.shape:
            raise ValueError(f"logits_fn returned shape {logits.shape} for input {batch.shape}")
        nll = _token_nll(logits, batch)
        total += float(nll.sum())
        count += nll.size
    mean = total / count
    return PerplexityResult(float(np.exp(mean)), mean, count, len(windows))


def top1_agreement(logits_a: LogitsFn, logits_b: LogitsFn, windows: np.ndarray, *, batch_size: int = 1) -> float:
    """Share of positions (all positions of all windows) where both models' argmax agree."""
    same, count = 0, 0
    for batch in _batches(windows, batch_size):
        a = np.asarray(logits_a(batch)).argmax(-1)
        b = np.asarray(logits_b(batch)).argmax(-1)
        same += int((a == b).sum())
        count += a.size
    return same / count


def greedy_from_logits(logits_fn: LogitsFn, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by re-running the whole sequence each step (no cache; for short checks)."""
    seq = list(map(int, prompt))
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = np.asarray(logits_fn(np.asarray([seq], dtype=np.int64)))
        tok = int(logits[0, -1].argmax())
        new.append(tok)
        seq.append(tok)
    return new


@dataclass(frozen=True)
class GreedyMatch:
    """Per prompt: first position where the continuations differ (None = identical)."""

    first_divergence: tuple[int | None, ...]
    max_new_tokens: int

    @property
    def identical(self) -> float:
        """Share of prompts whose continuations are identical."""
        return sum(d is None for d in self.first_divergence) / max(len(self.first_divergence), 1)

    @property
    def mean_matched_tokens(self) -> float:
        """Mean length of the common prefix, in tokens."""
        lens = [self.max_new_tokens if d is None else d for d in self.first_divergence]
        return float(np.mean(lens)) if lens else 0.0


def greedy_match(
    generate_a: GenerateFn, generate_b: GenerateFn, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> GreedyMatch:
    """Compare greedy continuations; ``generate_x(prompt_ids, n) -> n new ids`` (e.g. via
    :func:`greedy_from_logits` or ``OrtCausalLM.generate``)."""
    firsts: list[int | None] = []
    for prompt in prompts:
        a = list(generate_a(list(prompt), max_new_tokens))
        b = list(generate_b(list(prompt), max_new_tokens))
        diff = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if diff is None and len(a) != len(b):
            diff = min(len(a), len(b))
        firsts.append(diff)
    return GreedyMatch(tuple(firsts), max_new_tokens)
