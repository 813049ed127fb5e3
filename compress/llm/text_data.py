"""Text for calibration and evaluation of causal LMs: read, tokenise into fixed windows, split, hash.

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
same Python; ``text`` UTF-8 text; ``jsonl`` one JSON object per line, the text under ``field``.
``path`` (text and jsonl) is a file, a folder (its ``*.txt`` and ``*.md`` files for text, ``*.jsonl`` for
jsonl, searched recursively) or a glob (``docs/**/*.md``), read in sorted path order; relative paths start
at the working directory. ``max_records`` caps the records read, whatever the kind: pydoc topics, JSONL
lines, or for text the paragraphs (blocks separated by a blank line). Files, records and topics are joined
with a blank line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.data.jsonl import json_lines
from compress.errors import ConfigError
from compress.schema import Count

SEPARATOR = "\n\n"


class TextSource(BaseModel):
    """Where the text comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["pydoc", "text", "jsonl"] = Field(description="pydoc topics, a text file, or JSONL.")
    path: Path | None = Field(
        None, description="A file, a folder (its *.txt / *.md, or *.jsonl files) or a glob (text and jsonl only)."
    )
    field: str | None = Field(None, description="JSONL key holding the text (jsonl only).")
    max_records: Count | None = Field(
        None, ge=1, description="Read at most this many records: pydoc topics, JSONL lines, text paragraphs."
    )

    @model_validator(mode="after")
    def _check(self) -> TextSource:
        if self.kind == "pydoc" and (self.path or self.field):
            raise ConfigError(f"text source pydoc takes no path/field; got path={self.path}, field={self.field}")
        if self.kind in ("text", "jsonl") and self.path is None:
            raise ConfigError(f"text source {self.kind} needs a path")
        if self.kind == "jsonl" and not self.field:
            raise ConfigError("text source jsonl needs field: the key of the text in each record")
        if self.kind == "text" and self.field:
            raise ConfigError(f"text source text takes no field; got {self.field!r}")
        return self


FOLDER_SUFFIXES = {"text": (".txt", ".md"), "jsonl": (".jsonl",)}  # what a folder contributes, per kind
_GLOB_CHARS = frozenset("*?[")


def text_files(source: TextSource) -> list[Path]:
    """The files a text/jsonl source reads, in order; ConfigError naming the path when there are none."""
    path = Path(source.path).expanduser()  # type: ignore[arg-type]
    suffixes = FOLDER_SUFFIXES[source.kind]
    where = f"data.text.path: '{source.path}'"
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


def read_text(source: TextSource) -> str:
    """The whole text of a source as one string."""
    if source.kind == "pydoc":
        from pydoc_data.topics import topics

        parts = [topics[k] for k in sorted(topics)][: source.max_records]
        return SEPARATOR.join(parts)
    parts: list[str] = []
    for path in text_files(source):
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


def token_hash(ids: np.ndarray) -> str:
    """sha256 of the token ids (int64 little-endian) and their shape: the data hash for the manifest."""
    arr = np.ascontiguousarray(np.asarray(ids, dtype="<i8"))
    h = hashlib.sha256(json.dumps(list(arr.shape)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()
