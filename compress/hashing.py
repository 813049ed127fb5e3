"""Content hashes for cache keys: sha256 over canonical JSON, and over the whole content of files.

File digests are remembered in a small JSON file (`digests.json` under the runs dir's `.cache/`) keyed by
(absolute path, size, mtime_ns, inode), so a rerun does not re-read unchanged multi-GB files.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from compress.atomic import write_json_atomic

DIGESTS_FILE = "digests.json"
RACY_NS = 2_000_000_000  # a file modified this recently may change again within the same mtime tick


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cached_sha256(path: str | Path, cache_dir: Path | None = None) -> str:
    """sha256 of the whole file, read again only when its (path, size, mtime_ns, inode) changed.

    Without `cache_dir` the file is always read. A file modified less than 2 s before it was hashed is not
    remembered (it could change again within one mtime tick). Limit: a rewrite that restores size,
    mtime_ns and inode (an in-place write followed by `touch -d` or `os.utime`) is not seen; pass
    `--force` for the stage, or delete `.cache/digests.json`, after such an edit.
    """
    if cache_dir is None:
        return sha256_file(path)
    path = Path(path).resolve()
    stamp = _stamp(path)
    cache_file = cache_dir / DIGESTS_FILE
    entry = _read_digests(cache_file).get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = sha256_file(path)
    if time.time_ns() - stamp[1] >= RACY_NS and _stamp(path) == stamp:
        _remember(cache_file, str(path), {"stamp": stamp, "sha256": digest})
    return digest


def file_fingerprint(path: str | Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """Identity of a file for a cache key: its name, size and the sha256 of its whole content."""
    path = Path(path)
    return {"name": path.name, "size": path.stat().st_size, "sha256": cached_sha256(path, cache_dir)}


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]  # a list: it is compared with one read from JSON


def _read_digests(cache_file: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(cache_file: Path, key: str, entry: dict[str, Any]) -> None:
    """Merge one entry into the digest file (re-read first, so a concurrent run's entries survive)."""
    data = {k: v for k, v in _read_digests(cache_file).items() if Path(k).exists()}
    data[key] = entry
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_file, data)
    except OSError:
        pass  # the digest cache only saves time: a run does not fail because it cannot be written
