"""Files the runner caches beside an artifact (evaluation, benchmark, per-sample arrays): written atomically,
checksummed, and verified before anyone (a re-run, the report, `compress compare`) trusts them.

Arrays are stored with `allow_pickle=False` both ways: a cache file is data, never code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compress.atomic import atomic_path, write_json_atomic
from compress.hashing import sha256_file, sha256_json


def write_cached(path: Path, key: str, payload: dict[str, Any]) -> None:
    """Write a cache file for `key` atomically, with a checksum of its payload."""
    payload = json.loads(json.dumps(payload, default=str))  # checksum what a reader will see
    write_json_atomic(path, {"key": key, "sha256": sha256_json(payload), **payload})


def read_cached(path: Path, key: str | None) -> dict[str, Any] | None:
    """The payload `write_cached` wrote for `key` (any key when None); None when missing, stale, unreadable
    or altered."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or (key is not None and data.get("key") != key):
        return None
    payload = {k: v for k, v in data.items() if k not in ("key", "sha256")}
    return payload if data.get("sha256") == sha256_json(payload) else None


def save_predictions(path: Path, predictions: np.ndarray) -> str:
    """np.save under a temporary name, renamed when complete; returns the file's sha256."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, predictions, allow_pickle=False)
    return sha256_file(path)


def load_predictions(path: Path, sha256: str | None) -> np.ndarray | None:
    """The saved predictions when the file is there and matches `sha256`, else None."""
    try:
        if sha256 is None or sha256_file(path) != sha256:
            return None
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> str:
    """Named per-sample arrays as one .npz, written atomically; returns the file's sha256."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})
    return sha256_file(path)


def load_arrays(path: Path, sha256: str | None) -> dict[str, np.ndarray] | None:
    """The arrays `save_arrays` wrote when the file matches `sha256`, else None."""
    try:
        if sha256 is None or sha256_file(path) != sha256:
            return None
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError):
        return None
