"""The text-encoder task: a labelled retrieval set, embedding it, and the metrics.

The set (`RetrievalSet`): evaluation queries, a corpus with the index of each query's positive document,
and calibration queries that are never evaluated.
- `pydoc`: CPython's `pydoc_data.topics.topics` (79 help topics, always installed). From each topic with
  at least two prose sentences of 8-40 words among its first eight, two are drawn (seeded): one evaluation
  query and one calibration query. The corpus is every topic's text (whitespace collapsed) with its drawn
  sentences cut out, so a query is never found verbatim; its positive is its own topic.
- `jsonl`: one `{"query": "...", "positive": "..."}` object per line. The first `calibration_queries` lines
  calibrate; the next `evaluation_queries` (default: the rest) are scored against the corpus made of their
  distinct positives.

Metrics, all in percent: `cosine_pct`, the mean cosine similarity of each text's embedding to the FP32
source model's (torch) on the same inputs — the primary metric, 100 means the same directions;
`recall@1`, `recall@5` and `mrr` of the evaluation queries against the corpus (cosine similarity; a tie
counts against the query).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.data.jsonl import json_lines
from compress.errors import ConfigError

#: the sentences of a topic a query may be drawn from (a sentence encoder sees the start of a document)
LEAD_SENTENCES = 8
MIN_WORDS, MAX_WORDS = 8, 40
RECALL_AT = (1, 5)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"*(])")


@dataclass(frozen=True)
class RetrievalSet:
    queries: tuple[str, ...]  # evaluation queries
    corpus: tuple[str, ...]
    positives: tuple[int, ...]  # corpus index of each query's positive
    calibration: tuple[str, ...]  # calibration queries, never among `queries`

    def sha256(self, role: str, max_length: int) -> str:
        """What a stage (calibration) or an evaluation reads, with the truncation applied to it."""
        if role == "calibration":
            payload: Any = {"texts": self.calibration, "max_length": max_length}
        else:
            payload = {"queries": self.queries, "corpus": self.corpus, "positives": self.positives}
            payload["max_length"] = max_length
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def pydoc_set(*, calibration: int, evaluation: int | None, seed: int) -> RetrievalSet:
    """The retrieval set drawn from CPython's help topics (see the module docstring)."""
    from pydoc_data.topics import topics

    rng = np.random.default_rng(seed)
    corpus, drawn = [], []  # drawn: (topic index, evaluation sentence, calibration sentence)
    for index, key in enumerate(sorted(topics)):
        text = " ".join(topics[key].split())
        lead = _prose_sentences(topics[key])[:LEAD_SENTENCES]
        if len(lead) >= 2:
            first, second = rng.choice(len(lead), size=2, replace=False)
            drawn.append((index, lead[first], lead[second]))
            for sentence in (lead[first], lead[second]):
                if sentence not in text:
                    raise RuntimeError(f"pydoc topic {key!r}: drawn sentence not found in its collapsed text")
                text = " ".join(text.replace(sentence, " ", 1).split())
        corpus.append(text)
    order = rng.permutation(len(drawn))
    picked = [drawn[i] for i in order]
    _check_counts("pydoc", len(picked), calibration, evaluation, shared=False)
    scored = picked[: evaluation or len(picked)]
    return RetrievalSet(
        queries=tuple(q for _, q, _ in scored),
        corpus=tuple(corpus),
        positives=tuple(i for i, _, _ in scored),
        calibration=tuple(c for _, _, c in picked[:calibration]),
    )


def _prose_sentences(topic: str) -> list[str]:
    """Sentences of a topic's prose paragraphs (not indented code or grammar, not heading underlines)."""
    out = []
    for paragraph in re.split(r"\n\s*\n", topic):
        lines = paragraph.strip("\n").splitlines()
        if not lines or any(line.startswith(" ") for line in lines) or set(lines[-1]) <= set("*=-"):
            continue
        for sentence in _SENTENCE_END.split(" ".join(" ".join(lines).split())):
            words = sentence.split()
            if MIN_WORDS <= len(words) <= MAX_WORDS and sentence.endswith(".") and "::=" not in sentence:
                out.append(sentence)
    return out


def jsonl_set(path: Path, *, calibration: int, evaluation: int | None) -> RetrievalSet:
    """The retrieval set of a JSONL file of {query, positive} pairs (see the module docstring)."""
    pairs = read_pairs(path)
    _check_counts(str(path), len(pairs), calibration, evaluation, shared=True)
    scored = pairs[calibration : calibration + evaluation if evaluation else None]
    corpus: dict[str, int] = {}
    positives = tuple(corpus.setdefault(positive, len(corpus)) for _, positive in scored)
    return RetrievalSet(
        queries=tuple(q for q, _ in scored),
        corpus=tuple(corpus),
        positives=positives,
        calibration=tuple(q for q, _ in pairs[:calibration]),
    )


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(query, positive) of every non-blank line; a line that is not such an object is named."""
    pairs = []
    if not path.is_file():
        raise ConfigError(f"data.pairs.path = {path}: no such file")
    for lineno, record in json_lines(path):
        values = [record.get(k) if isinstance(record, dict) else None for k in ("query", "positive")]
        if not all(isinstance(v, str) and v.strip() for v in values):
            raise ConfigError(f'{path}:{lineno}: expected {{"query": "...", "positive": "..."}} with non-empty strings')
        pairs.append((values[0], values[1]))
    return pairs


def _check_counts(where: str, available: int, calibration: int, evaluation: int | None, *, shared: bool) -> None:
    """Calibration and evaluation queries are disjoint: from one pool of pairs (jsonl), or one pair per topic
    for evaluation and another sentence of the same topics for calibration (pydoc)."""
    need = calibration + (evaluation or 1) if shared else max(calibration, evaluation or 1)
    if need > available:
        asked = f"data.calibration_queries = {calibration}" + (
            f" and data.evaluation_queries = {evaluation}" if evaluation else ""
        )
        raise ConfigError(
            f"{asked}: {where} gives {available} {'pairs' if shared else 'topics with queries'}"
            + ("; calibration and evaluation take separate pairs, at least one left for evaluation" if shared else "")
        )


# -- embedding and metrics ---------------------------------------------------------------------------------
Run = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def encode(tokenizer: Any, texts: Sequence[str], max_length: int, *, pad_to_max: bool = False) -> dict[str, np.ndarray]:
    """Token arrays (B, T) int64 by input name; padded to the longest text (or to `max_length`)."""
    enc = tokenizer(
        list(texts),
        padding="max_length" if pad_to_max else True,
        truncation=True,
        max_length=max_length,
        return_attention_mask=True,
        return_tensors="np",
    )
    return {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in enc.items()}


def batches(tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(texts), batch_size):
        yield encode(tokenizer, texts[start : start + batch_size], max_length)


def embed(
    run: Run, tokenizer: Any, texts: Sequence[str], *, max_length: int, batch_size: int, advance=None
) -> np.ndarray:
    """(N, H) float32 embeddings of `texts`; batched by length (less padding), returned in the given order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[np.ndarray] = []
    for inputs in batches(tokenizer, [texts[i] for i in order], max_length, batch_size):
        out.append(np.asarray(run(inputs)[0], dtype=np.float32))
        if advance is not None:
            advance(len(out[-1]))
    stacked = np.concatenate(out)
    result = np.empty_like(stacked)
    result[order] = stacked
    return result


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm == 0, 1.0, norm)


def cosine_pct(a: np.ndarray, b: np.ndarray) -> float:
    """Mean row-wise cosine similarity of two (N, H) embedding arrays, in percent."""
    return 100.0 * float((_unit(a) * _unit(b)).sum(axis=-1).mean())


def retrieval_metrics(queries: np.ndarray, corpus: np.ndarray, positives: Sequence[int]) -> dict[str, float]:
    """Recall@k and MRR (percent) of each query's positive among the corpus, by cosine similarity.

    A query's rank is the number of other documents scoring at least as high as its positive, so a model
    that scores everything alike ranks every positive last instead of first.
    """
    scores = _unit(queries) @ _unit(corpus).T  # (Q, D)
    pos = np.asarray(positives)
    target = scores[np.arange(len(pos)), pos]  # (Q,)
    rank = (scores >= target[:, None]).sum(axis=1) - 1  # (Q,) 0 = first
    metrics = {f"recall@{k}": 100.0 * float((rank < k).mean()) for k in RECALL_AT}
    metrics["mrr"] = 100.0 * float((1.0 / (rank + 1)).mean())
    return metrics
