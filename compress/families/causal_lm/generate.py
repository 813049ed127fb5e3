"""Text generation over any decoder session (`compress.backends.DecoderSession`): sampling options and
the logits processors.

    result = generate(session, [[1, 2, 3]], GenerationOptions(max_new_tokens=16))

The prompt batch is left-padded (pad positions have mask 0), one prefill run fills the cache, then each
decode step appends one token per row. The logits processors follow Hugging Face ``generate`` semantics:
repetition penalty (Keskar et al. 2019, CTRL, arXiv:1909.05858), temperature, top-k, then nucleus /
top-p (Holtzman et al. 2019, arXiv:1904.09751); no-repeat-n-gram bans a token that would repeat an n-gram
of the sequence (prompt included). With ``num_beams > 1`` it is Hugging Face's beam search (one prompt at a
time, the beams as the session's batch, the cache reordered by each step's parent beam through the session's
``reorder``): the processors act on log-probabilities, a hypothesis ends at a stop token or the length limit
and scores sum-logprob / new_tokens**length_penalty, and the search stops early by HF's default
(``early_stopping=False``) heuristic. Written here rather than calling ``transformers.generate`` so every
backend (torch, our ONNX export, the fused genai graph) runs the same engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    num_beams: int = Field(1, ge=1, description="Beam search with this many beams; 1 = greedy or sampling.")
    length_penalty: float = Field(
        1.0, description="Beam score = sum log-prob / new_tokens**length_penalty; > 0 favours longer text."
    )
    no_repeat_ngram_size: int = Field(0, ge=0, description="Never repeat an n-gram of this size; 0 = off.")

    @model_validator(mode="after")
    def _one_search(self) -> GenerationOptions:
        if self.num_beams > 1 and self.do_sample:
            raise ValueError(f"num_beams = {self.num_beams} with do_sample: beam sampling is not implemented")
        return self


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


def banned_ngram_tokens(sequence: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already in `sequence` (HF ``NoRepeatNGramLogitsProcessor``)."""
    if n <= 0 or len(sequence) + 1 < n:
        return []
    prefix = tuple(sequence[len(sequence) - n + 1 :])
    return [sequence[i + n - 1] for i in range(len(sequence) - n + 1) if tuple(sequence[i : i + n - 1]) == prefix]


def process_scores(
    scores: np.ndarray, seen: np.ndarray, histories: Sequence[Sequence[int]], opts: GenerationOptions
) -> np.ndarray:
    """Repetition penalty then no-repeat-n-gram on (B, V) scores (logits, or log-probs in beam search)."""
    scores = scores.astype(np.float64)
    if opts.repetition_penalty != 1.0:
        penalised = np.where(scores > 0, scores / opts.repetition_penalty, scores * opts.repetition_penalty)
        scores = np.where(seen, penalised, scores)
    if opts.no_repeat_ngram_size:
        for b, history in enumerate(histories):
            banned = [t for t in banned_ngram_tokens(history, opts.no_repeat_ngram_size) if t < scores.shape[-1]]
            scores[b, banned] = -np.inf
    return scores


def next_tokens(
    logits: np.ndarray,
    seen: np.ndarray,
    opts: GenerationOptions,
    rng: np.random.Generator,
    histories: Sequence[Sequence[int]] = (),
) -> np.ndarray:
    """Pick one token per row from last-position logits (B, V), in Hugging Face processor order.

    `histories` (each row's tokens so far, prompt included) is needed only for no-repeat-n-gram."""
    if opts.no_repeat_ngram_size and len(histories) != logits.shape[0]:
        raise ValueError("next_tokens: no_repeat_ngram_size needs each row's history")
    scores = process_scores(logits, seen, histories, opts)
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


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def beam_search(
    session: DecoderSession, prompt: Sequence[int], opts: GenerationOptions
) -> tuple[list[int], str, float, float, int]:
    """HF beam search for one prompt: (new tokens of the best hypothesis, finish reason, prefill s, decode s,
    decode steps). Needs ``session.reorder(state, rows)``."""
    reorder = getattr(session, "reorder", None)
    if reorder is None:
        raise ValueError(f"beam search needs a session with reorder(state, rows); {type(session).__name__} has none")
    beams, width, limit = opts.num_beams, len(prompt), opts.max_new_tokens
    stops = set(opts.stop_token_ids)
    keep = max(2, 1 + len(stops)) * beams  # HF: enough candidates that `beams` of them can go on
    start = time.perf_counter()
    logits, state = session.prefill(np.asarray([prompt], dtype=np.int64), np.ones((1, width), np.int64), last_only=True)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    state = reorder(state, np.zeros(beams, dtype=np.int64))
    last = np.repeat(logits[:, -1], beams, axis=0)  # (beams, V)
    vocab = last.shape[-1]
    seqs = [list(map(int, prompt)) for _ in range(beams)]
    scores = np.full(beams, -1e9)
    scores[0] = 0.0  # all beams start equal: only the first may be expanded at step 1
    finished: list[tuple[float, list[int]]] = []
    steps = 0
    for i in range(limit):
        seen = np.zeros((beams, vocab), dtype=bool)
        for b, seq in enumerate(seqs):
            seen[b, [t for t in seq if t < vocab]] = True
        logp = process_scores(_log_softmax(last), seen, seqs, opts) + scores[:, None]  # (beams, V)
        flat = logp.ravel()
        top = np.argsort(-flat, kind="stable")[:keep]
        parents, tokens, cand = top // vocab, top % vocab, flat[top]
        hits = np.array([int(t) in stops or i == limit - 1 for t in tokens])
        for r in range(beams):  # only the best `beams` candidates may finish (HF's top_num_beam_mask)
            if hits[r]:
                finished.append((float(cand[r]) / (i + 1) ** opts.length_penalty, [*seqs[parents[r]], int(tokens[r])]))
        finished = sorted(finished, key=lambda f: -f[0])[:beams]
        running = np.where(hits, cand - 1e9, cand)
        order = np.argsort(-running, kind="stable")[:beams]
        seqs = [[*seqs[parents[k]], int(tokens[k])] for k in order]
        scores = running[order]
        if hits.all() or i == limit - 1:
            break
        if len(finished) == beams and scores[0] / (i + 1) ** opts.length_penalty <= finished[-1][0]:
            break  # HF early_stopping=False: the best running beam can no longer beat the worst finished one
        state = reorder(state, parents[order])
        logits, state = session.decode(np.asarray([s[-1] for s in seqs], dtype=np.int64)[:, None], state)
        last = logits[:, -1]
        steps += 1
    best = finished[0][1][width:] if finished else seqs[0][width:]
    reason = "stop" if best and best[-1] in stops else "length"
    return best, reason, prefill_s, time.perf_counter() - start, steps


def generate(
    session: DecoderSession,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    options: GenerationOptions | None = None,
    *,
    on_token: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Generate for a batch of token-id prompts (left-padded internally) with a decoder session of any backend.

    `on_token(row, token)` is called as each token is chosen (beam search: the best hypothesis, at its end)."""
    opts = options or GenerationOptions()
    rows = [list(map(int, p)) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate: every prompt needs at least one token")
    if opts.num_beams > 1 and opts.max_new_tokens > 0:
        runs = [beam_search(session, r, opts) for r in rows]
        for b, run in enumerate(runs if on_token is not None else ()):
            for tok in run[0]:
                on_token(b, tok)
        return GenerationResult(
            [r[0] for r in runs], [r[1] for r in runs], *(sum(r[k] for r in runs) for k in (2, 3, 4))
        )
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
        histories = [r + o for r, o in zip(rows, out, strict=True)] if opts.no_repeat_ngram_size else ()
        nxt = next_tokens(logits[:, -1], seen, opts, rng, histories)  # (B,)
        for b in range(batch):
            if done[b]:
                nxt[b] = opts.pad_token_id
                continue
            tok = int(nxt[b])
            out[b].append(tok)
            seen[b, tok] = True
            if on_token is not None:
                on_token(b, tok)
            if tok in stops:
                done[b], reasons[b] = True, "stop"
        if done.all() or i == opts.max_new_tokens - 1:
            break
        logits, state = session.decode(nxt[:, None], state)
        steps += 1
    return GenerationResult(out, reasons, prefill_s, time.perf_counter() - start, steps)
