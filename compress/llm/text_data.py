"""Text for calibration and evaluation of causal LMs: read, tokenise into fixed windows, split, hash.

    text = read_text(TextSource(kind="pydoc"))
    windows = tokenize_windows(text, tokenizer, window=512)          # (N, 512) int64
    split = split_windows(windows, evaluation=32, calibration=64)
    manifest["data"] = {"evaluation": token_hash(split.evaluation), ...}

Windows are consecutive, non-overlapping slices of the token stream of the whole text (the tail shorter
than a window is dropped). The split gives evaluation the FIRST ``evaluation`` windows and draws
calibration from the windows after them (in order, or a seeded random choice among them), so no token of
the evaluation set is ever seen in calibration.

Sources: ``pydoc`` is CPython's ``pydoc_data.topics.topics`` (79 help topics, ~465k characters, always
installed, PSF licence), joined in sorted key order so the stream is the same on every machine with the
same Python; ``text`` a UTF-8 file; ``jsonl`` one JSON object per line, the text under ``field``.
Records and topics are joined with a blank line.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.errors import ConfigError
from compress.schema import Count

SEPARATOR = "\n\n"


class TextSource(BaseModel):
    """Where the text comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["pydoc", "text", "jsonl"] = Field(description="pydoc topics, a text file, or JSONL.")
    path: Path | None = Field(None, description="File to read (text and jsonl only).")
    field: str | None = Field(None, description="JSONL key holding the text (jsonl only).")
    max_records: Count | None = Field(None, ge=1, description="Read at most this many topics/records.")

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


def read_text(source: TextSource) -> str:
    """The whole text of a source as one string."""
    if source.kind == "pydoc":
        from pydoc_data.topics import topics

        parts = [topics[k] for k in sorted(topics)][: source.max_records]
        return SEPARATOR.join(parts)
    path = Path(source.path)  # type: ignore[arg-type]
    if not path.is_file():
        raise ConfigError(f"text source {source.kind}: file {path} not found")
    if source.kind == "text":
        return path.read_text(encoding="utf-8")
    parts = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or source.field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ConfigError(f"{path}:{lineno}: no field {source.field!r}; record has {keys}")
            parts.append(str(record[source.field]))
            if source.max_records and len(parts) >= source.max_records:
                break
    return SEPARATOR.join(parts)


def tokenize_windows(text: str, tokenizer: Any, *, window: int, max_windows: int | None = None) -> np.ndarray:
    """Token ids of ``text`` cut into consecutive windows (N, window) int64; the short tail is dropped.

    Special tokens are not added: windows are slices of one stream, so a BOS would only mark the first.
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
    count = len(ids) // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ConfigError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    return ids[: count * window].reshape(count, window)  # (N, window)


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
