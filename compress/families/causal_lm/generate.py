"""Text generation over any decoder session (`compress.backends.DecoderSession`): sampling options and
the logits processors.

    result = generate(session, [[1, 2, 3]], GenerationOptions(max_new_tokens=16))

The prompt batch is left-padded (pad positions have mask 0), one prefill run fills the cache, then each
decode step appends one token per row. The logits processors follow Hugging Face ``generate`` semantics:
repetition penalty (Keskar et al. 2019, CTRL, arXiv:1909.05858), temperature, top-k, then nucleus /
top-p (Holtzman et al. 2019, arXiv:1904.09751).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from compress.backends import DecoderSession


class GenerationOptions(BaseModel):
    """How to pick the next token; defaults are greedy decoding of 32 tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(32, ge=0, description="Tokens to generate per prompt at most.")
    do_sample: bool = Field(False, description="Sample from the processed distribution; False = greedy.")
    temperature: float = Field(1.0, gt=0.0, description="Divide logits by this before sampling.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens when sampling; 0 = all.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Keep the smallest set with this probability mass.")
    repetition_penalty: float = Field(
        1.0, gt=0.0, description="CTRL penalty on tokens already in the sequence; 1.0 = off."
    )
    stop_token_ids: tuple[int, ...] = Field((), description="A row stops after emitting one of these.")
    seed: int | None = Field(None, description="Seed of the sampler; same seed, same tokens.")
    pad_token_id: int = Field(0, ge=0, description="Id used for left padding and after a row stops.")


@dataclass
class GenerationResult:
    """New tokens per prompt (stop token included), why each row ended, and wall-clock timings."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int

    @property
    def decode_tokens_per_second(self) -> float:
        """Per-row decode rate × batch: tokens produced by decode steps per second."""
        produced = self.decode_steps * len(self.tokens)
        return produced / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def next_tokens(logits: np.ndarray, seen: np.ndarray, opts: GenerationOptions, rng: np.random.Generator) -> np.ndarray:
    """Pick one token per row from last-position logits (B, V), in Hugging Face processor order."""
    scores = logits.astype(np.float64)
    if opts.repetition_penalty != 1.0:
        penalised = np.where(scores > 0, scores / opts.repetition_penalty, scores * opts.repetition_penalty)
        scores = np.where(seen, penalised, scores)
    if not opts.do_sample:
        return scores.argmax(axis=-1).astype(np.int64)
    scores = scores / opts.temperature
    if 0 < opts.top_k < scores.shape[-1]:
        kth = np.partition(scores, -opts.top_k, axis=-1)[:, -opts.top_k][:, None]  # (B, 1)
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if opts.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        keep_sorted = (np.cumsum(sorted_p, axis=-1) - sorted_p) < opts.top_p  # always keeps the first
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    cdf = np.cumsum(probs, axis=-1)  # (B, V)
    u = rng.random(probs.shape[0])[:, None] * cdf[:, -1:]
    return np.minimum((cdf < u).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)


def generate(
    session: DecoderSession, prompts: Sequence[Sequence[int]] | np.ndarray, options: GenerationOptions | None = None
) -> GenerationResult:
    """Generate for a batch of token-id prompts (left-padded internally) with a decoder session of any backend."""
    opts = options or GenerationOptions()
    rows = [list(map(int, p)) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate: every prompt needs at least one token")
    batch, width = len(rows), max(len(r) for r in rows)
    ids = np.full((batch, width), opts.pad_token_id, dtype=np.int64)  # (B, T) left padded
    mask = np.zeros((batch, width), dtype=np.int64)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = r
        mask[b, width - len(r) :] = 1
    rng = np.random.default_rng(opts.seed)
    out: list[list[int]] = [[] for _ in rows]
    reasons = ["length"] * batch
    done = np.zeros(batch, dtype=bool)
    if opts.max_new_tokens == 0:
        return GenerationResult(out, reasons, 0.0, 0.0, 0)
    start = time.perf_counter()
    logits, state = session.prefill(ids, mask, last_only=True)
    prefill_s = time.perf_counter() - start
    vocab = logits.shape[-1]
    seen = np.zeros((batch, vocab), dtype=bool)  # tokens in each sequence, for the repetition penalty
    for b, r in enumerate(rows):
        seen[b, [t for t in r if t < vocab]] = True
    stops = set(opts.stop_token_ids)
    steps = 0
    start = time.perf_counter()
    for i in range(opts.max_new_tokens):
        nxt = next_tokens(logits[:, -1], seen, opts, rng)  # (B,)
        for b in range(batch):
            if done[b]:
                nxt[b] = opts.pad_token_id
                continue
            tok = int(nxt[b])
            out[b].append(tok)
            seen[b, tok] = True
            if tok in stops:
                done[b], reasons[b] = True, "stop"
        if done.all() or i == opts.max_new_tokens - 1:
            break
        logits, state = session.decode(nxt[:, None], state)
        steps += 1
    return GenerationResult(out, reasons, prefill_s, time.perf_counter() - start, steps)
