"""The causal-lm task: text read, tokenised into fixed windows, split and hashed; perplexity, next-token
agreement and greedy match, scored through any decoder session's `logits` / `continue_greedy`.

    text = read_text(TextSource(kind="pydoc"))
    windows = tokenize_windows(text, tokenizer, window=512)          # (N, 512) int64
    split = split_windows(windows, evaluation=32, calibration=64)
    manifest["data"] = {"evaluation": token_hash(split.evaluation), ...}

Windows are consecutive, non-overlapping slices of the token stream of the whole text (the tail shorter
than a window is dropped). They follow the tokenizer's own BOS rule (`bos_token`): a tokenizer that
prepends BOS to what it encodes (Gemma-style `add_bos_token`) gets windows of BOS + (window - 1) stream
tokens, so the model is evaluated in the regime it was trained in; one that adds none gets plain slices.
Prompts are encoded the same way (`encode_prompt`: the tokenizer's special tokens, as it adds them).

The split gives evaluation the FIRST ``evaluation`` windows and draws calibration from the windows after
them (in order, or a seeded random choice among them), so no token of the evaluation set is ever seen in
calibration.

Sources: ``pydoc`` is CPython's ``pydoc_data.topics.topics`` (79 help topics, ~465k characters, always
installed, PSF licence), joined in sorted key order so the stream is the same on every machine with the
same Python; ``text`` UTF-8 text; ``jsonl`` one JSON object per line, the text under ``field``;
``fortunes`` BSD fortune files (Debian package ``fortunes``: prose, not technical docs; ``fortunes.py``).
``path`` (text and jsonl) is a file, a folder (its ``*.txt`` and ``*.md`` files for text, ``*.jsonl`` for
jsonl, searched recursively) or a glob (``docs/**/*.md``), read in sorted path order; relative paths start
at the working directory. ``max_records`` caps the records read, whatever the kind: pydoc topics, JSONL
lines, fortunes, or for text the paragraphs (blocks separated by a blank line). Files, records and topics
are joined with a blank line.

Several texts (`data.texts`): each is cut into windows on its own and split the same way, so its evaluation
windows never overlap its calibration windows; `mix_calibration` draws the calibration windows round-robin
from the texts named (`data.calibration_texts`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.data.jsonl import json_lines
from compress.errors import ConfigError
from compress.families.causal_lm.options import TextSource

SEPARATOR = "\n\n"


FOLDER_SUFFIXES = {"text": (".txt", ".md"), "jsonl": (".jsonl",)}  # what a folder contributes, per kind
_GLOB_CHARS = frozenset("*?[")


def text_files(source: TextSource, key: str = "data.text") -> list[Path]:
    """The files a source reads, in order (`key` is its key in the pipeline file, for errors); ConfigError
    naming the path when there are none."""
    if source.kind == "fortunes":
        from compress.families.causal_lm.fortunes import fortune_files

        return fortune_files(source, key)
    path = Path(source.path).expanduser()  # type: ignore[arg-type]
    suffixes = FOLDER_SUFFIXES[source.kind]
    where = f"{key}.path: '{source.path}'"
    if _GLOB_CHARS & set(str(path)):
        anchor = Path(path.anchor) if path.is_absolute() else Path()
        pattern = str(path.relative_to(anchor)) if path.is_absolute() else str(path)
        files = sorted(f for f in anchor.glob(pattern) if f.is_file())
        if not files:
            raise ConfigError(f"{where}: the glob matches no file (relative paths start at {Path.cwd()})")
        return files
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
        if not files:
            raise ConfigError(f"{where}: the folder has no {' / '.join('*' + s for s in suffixes)} file")
        return files
    if path.is_file():
        return [path]
    raise ConfigError(f"{where}: no such file, folder or glob match (relative paths start at {Path.cwd()})")


def read_text(source: TextSource, key: str = "data.text") -> str:
    """The whole text of a source as one string (`key`: its key in the pipeline file, for errors)."""
    if source.kind == "pydoc":
        from pydoc_data.topics import topics

        parts = [topics[k] for k in sorted(topics)][: source.max_records]
        return SEPARATOR.join(parts)
    if source.kind == "fortunes":
        from compress.families.causal_lm.fortunes import read_fortunes

        return SEPARATOR.join(read_fortunes(source, key))
    parts: list[str] = []
    for path in text_files(source, key):
        left = None if source.max_records is None else source.max_records - len(parts)
        if left == 0:
            break
        parts += _text_records(path, left) if source.kind == "text" else _jsonl_records(path, source.field, left)
    return SEPARATOR.join(parts)


def _text_records(path: Path, limit: int | None) -> list[str]:
    """A text file whole, or its first `limit` paragraphs."""
    text = _read_utf8(path)
    if limit is None:
        return [text]
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()][:limit]


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); data.text reads UTF-8 only") from None


def _jsonl_records(path: Path, field: str | None, limit: int | None) -> list[str]:
    parts = []
    for lineno, record in json_lines(path):
        if not isinstance(record, dict) or field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ConfigError(f"{path}:{lineno}: no field {field!r}; record has {keys}")
        parts.append(str(record[field]))
        if limit is not None and len(parts) >= limit:
            break
    return parts


def bos_token(tokenizer: Any) -> int | None:
    """The BOS id this tokenizer prepends to every text it encodes, or None when it adds none."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(special) > len(plain) and special[0] == bos and special[1 : 1 + len(plain)] == plain:
        return int(bos)
    return None


def bos_note(tokenizer: Any) -> str:
    """How windows and prompts begin, for the manifest and report."""
    bos = bos_token(tokenizer)
    if bos is None:
        return "no BOS: the tokenizer adds none (windows are plain slices of the token stream)"
    return f"windows start with BOS {bos}, as the tokenizer's own encoding does (BOS + window - 1 text tokens)"


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """A prompt's ids with the special tokens the tokenizer adds itself (a BOS, for one that needs it).

    An EOS the tokenizer appends (`add_eos_token`) is dropped: a prompt is to be continued, not ended.
    """
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and len(ids) > 1 and ids[-1] == eos and not str(prompt).endswith(str(tokenizer.eos_token)):
        ids.pop()
    return ids


def tokenize_windows(text: str, tokenizer: Any, *, window: int, max_windows: int | None = None) -> np.ndarray:
    """Token ids of ``text`` cut into consecutive windows (N, window) int64; the short tail is dropped.

    The text is one stream (no special tokens inside); each window starts with the tokenizer's BOS if it
    prepends one (`bos_token`), followed by window - 1 stream tokens.
    """
    if window < 2:
        raise ConfigError(f"window must be >= 2 tokens; got {window}")
    # The tokenizer warns that the text exceeds the model's length; this stream is cut below.
    tf_logger = logging.getLogger("transformers.tokenization_utils_base")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        tf_logger.setLevel(level)
    ids = np.asarray(ids, dtype=np.int64)
    bos = bos_token(tokenizer)
    span = window if bos is None else window - 1  # stream tokens per window
    count = len(ids) // span
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ConfigError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    windows = ids[: count * span].reshape(count, span)  # (N, span)
    if bos is None:
        return windows
    return np.concatenate([np.full((count, 1), bos, dtype=np.int64), windows], axis=1)  # (N, window)


@dataclass(frozen=True)
class WindowSplit:
    evaluation: np.ndarray
    calibration: np.ndarray
    evaluation_index: tuple[int, ...]
    calibration_index: tuple[int, ...]


def split_windows(windows: np.ndarray, *, evaluation: int, calibration: int, seed: int | None = None) -> WindowSplit:
    """Evaluation = the first ``evaluation`` windows; calibration = ``calibration`` windows after them,
    the next ones in order (``seed=None``) or a seeded choice without replacement among the rest."""
    n = len(windows)
    if evaluation < 0 or calibration < 0 or evaluation + calibration > n:
        raise ConfigError(
            f"asked for {evaluation} evaluation + {calibration} calibration windows; only {n} available "
            "(use a smaller window, fewer samples or more text)"
        )
    eval_idx = np.arange(evaluation)
    rest = np.arange(evaluation, n)
    if seed is None:
        cal_idx = rest[:calibration]
    else:
        cal_idx = np.sort(np.random.default_rng(seed).choice(rest, size=calibration, replace=False))
    return WindowSplit(windows[eval_idx], windows[cal_idx], tuple(eval_idx.tolist()), tuple(cal_idx.tolist()))


def calibration_shares(names: Sequence[str], total: int) -> dict[str, int]:
    """Calibration windows per text when `total` are drawn round-robin from `names` (the first texts take
    one more when `total` does not divide evenly)."""
    k = len(names)
    return {name: total // k + (i < total % k) for i, name in enumerate(names)}


@dataclass(frozen=True)
class TextSplits:
    """Every text's evaluation windows, and the calibration windows drawn round-robin from some of them."""

    evaluation: dict[str, np.ndarray]  # text name -> its first `evaluation` windows
    calibration: np.ndarray  # (C, T): text names[0]'s first, names[1]'s first, ..., names[0]'s second, ...
    calibration_texts: tuple[str, ...]  # (C,) the text each calibration window comes from


def mix_calibration(
    windows: dict[str, np.ndarray], names: Sequence[str], *, evaluation: int, calibration: int
) -> TextSplits:
    """Split each text as `split_windows` does (evaluation first, its calibration share right after) and
    interleave the calibration shares round-robin in the order of `names`. With one text this is
    `split_windows(windows, evaluation, calibration)` exactly."""
    shares = calibration_shares(names, calibration)
    splits = {}
    for name, ids in windows.items():
        try:
            splits[name] = split_windows(ids, evaluation=evaluation, calibration=shares.get(name, 0))
        except ConfigError as exc:
            raise ConfigError(f"text '{name}': {exc}") from None
    order = [(name, i) for i in range(max(shares.values(), default=0)) for name in names if i < shares[name]]
    cal = np.stack([splits[name].calibration[i] for name, i in order]) if order else np.empty((0, 0), np.int64)
    return TextSplits({name: split.evaluation for name, split in splits.items()}, cal, tuple(name for name, _ in order))


def token_hash(ids: np.ndarray) -> str:
    """sha256 of the token ids (int64 little-endian) and their shape: the data hash for the manifest."""
    arr = np.ascontiguousarray(np.asarray(ids, dtype="<i8"))
    h = hashlib.sha256(json.dumps(list(arr.shape)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


# -- metrics: one implementation, used by the adapter and the tests alike ----------------------------------
# ``logits_fn(input_ids (B, T) int64) -> logits (B, T, V)``: a decoder session's ``logits`` (torch or ONNX
# Runtime), so the number gated on is the number of the file shipped. Perplexity is exp of the mean
# next-token negative log-likelihood over non-overlapping windows, each scored on its own (the "fixed-length,
# non-overlapping" evaluation of the HF perplexity guide; it reads a little higher than a sliding window).

LogitsFn = Callable[[np.ndarray], np.ndarray]


def token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood (B, T-1) of each next token, computed in float64 for stability."""
    pred = logits[:, :-1].astype(np.float64)  # (B, T-1, V)
    target = ids[:, 1:]  # (B, T-1)
    peak = pred.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(pred - peak).sum(axis=-1)) + peak[..., 0]  # (B, T-1)
    chosen = np.take_along_axis(pred, target[..., None], axis=-1)[..., 0]  # (B, T-1)
    return lse - chosen


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity over windows, and the argmax at every position (what agreement compares)."""

    perplexity: float
    mean_nll: float
    tokens: int
    predictions: np.ndarray  # (N, T) int64
    window_nll: np.ndarray  # (N,) float64: mean next-token NLL of each window (the report's per-window plot)

    @property
    def windows(self) -> int:
        return len(self.predictions)


def perplexity(
    logits_fn: LogitsFn,
    windows: np.ndarray,
    *,
    batch_size: int = 1,
    advance: Callable[[int, float], None] | None = None,
) -> PerplexityResult:
    """Perplexity over windows (N, T): every window predicts its tokens 1..T-1 from the ones before.

    `advance(windows_done, running_ppl)` is called after each batch (progress display).
    """
    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (N, T) with T >= 2 tokens; got shape {windows.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    total, count = 0.0, 0
    predictions = np.empty(windows.shape, dtype=np.int64)  # (N, T)
    window_nll = np.empty(len(windows), dtype=np.float64)  # (N,) mean NLL of each window
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        logits = np.asarray(logits_fn(batch))
        if logits.shape[:2] != batch.shape:
            raise ValueError(f"logits_fn returned shape {logits.shape} for input {batch.shape}")
        predictions[start : start + len(batch)] = logits.argmax(-1)
        nll = token_nll(logits, batch)
        window_nll[start : start + len(batch)] = nll.mean(axis=1)
        total += float(nll.sum())
        count += nll.size
        if advance is not None:
            advance(len(batch), float(np.exp(total / count)))
    mean = total / count
    return PerplexityResult(float(np.exp(mean)), mean, count, predictions, window_nll)


def top1_agreement(predictions_a: np.ndarray, predictions_b: np.ndarray) -> float:
    """Share of positions with a next token (all but the last of each window) where both argmaxes agree."""
    return float((predictions_a[:, :-1] == predictions_b[:, :-1]).mean())


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
    continuations_a: Sequence[Sequence[int]], continuations_b: Sequence[Sequence[int]], max_new_tokens: int
) -> GreedyMatch:
    """Compare greedy continuations of the same prompts (e.g. from decoder sessions' `continue_greedy`)."""
    firsts: list[int | None] = []
    for a, b in zip(continuations_a, continuations_b, strict=True):
        diff = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if diff is None and len(a) != len(b):
            diff = min(len(a), len(b))
        firsts.append(diff)
    return GreedyMatch(tuple(firsts), max_new_tokens)
