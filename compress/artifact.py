"""Artifact: a model at one point of the pipeline, stored as a folder with an `artifact.json` manifest.

Folders are written under a temporary name and renamed when complete (`commit_artifact`), so a killed
run never leaves a half-written artifact that a later run would trust. The manifest records the size and
sha256 of every model file; `verify_files` checks them before a cached artifact is reused, so a truncated,
overwritten, deleted or added file is found and the artifact rebuilt instead of trusted.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from compress.atomic import write_json_atomic
from compress.hashing import cached_sha256, sha256_file, sha256_json

Format = Literal["torch", "onnx", "engine"]
MANIFEST = "artifact.json"
EVAL_FILE, BENCH_FILE, PREDICTIONS_FILE = "_evaluation.json", "_bench.json", "_predictions.npy"
SAMPLES_FILE = "_samples.npz"  # per-sample arrays of the evaluation (labels, confidences, window NLLs)
# not model files: each has its own integrity check
RUNNER_FILES = frozenset({MANIFEST, EVAL_FILE, BENCH_FILE, PREDICTIONS_FILE, SAMPLES_FILE})


@dataclass(frozen=True)
class Artifact:
    name: str
    path: Path  # the artifact's folder
    file: str  # main file inside the folder ("model.onnx", "model.safetensors", "." for a HF folder)
    format: Format
    precision: str  # fp32, fp16, int8, int4, ...
    stage: str  # stage kind that made it, or "source"
    parent: str | None  # name of the input artifact
    key: str  # cache key (sha256)
    config: dict[str, Any] = field(default_factory=dict)  # the stage options that made it
    info: dict[str, Any] = field(default_factory=dict)  # what the stage measured (parity, losses, ...)
    target: str | None = None  # deployment target (onnxruntime-cpu, tensorrt, ...)
    task_ready: bool = True  # False for a source model whose new head is still untrained
    unmeasured: str | None = None  # why it is not evaluated or benchmarked here (e.g. "needs an NVIDIA GPU")
    size_bytes: int = 0
    created: str = ""
    files: dict[str, dict[str, Any]] | None = None  # relative path -> {size, sha256} of every model file

    @property
    def main(self) -> Path:
        return self.path / self.file

    @property
    def content_digest(self) -> str:
        """sha256 over the recorded file hashes: children chain on it, so new bytes invalidate them."""
        if self.files is None:
            raise ValueError(f"artifact {self.name} has no recorded files (not committed by this version)")
        return sha256_json(self.files)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Artifact:
        return cls(**{**data, "path": Path(data["path"])})


def folder_size(path: Path) -> int:
    """Bytes on disk of the model files (the manifest and our side files excluded)."""
    if path.is_file():
        return path.stat().st_size
    return sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith("_")
    )


def model_files(folder: Path) -> list[str]:
    """Paths (relative, sorted) of the files an artifact consists of: all but the runner's and temporaries."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and str(p.relative_to(folder)) not in RUNNER_FILES and not _is_temp(p.name)
    )


def _is_temp(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def record_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every model file in `folder` (streamed: a multi-GB file is never held in memory)."""
    return {
        rel: {"size": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)} for rel in model_files(folder)
    }


def verify_files(art: Artifact, cache_dir: Path | None = None) -> str | None:
    """None when the folder holds exactly the recorded files, bytes unchanged; else what differs, in words.

    Sizes and the file list are checked first (no file is read), then the sha256 of each file;
    `cache_dir` remembers digests by (path, size, mtime_ns, inode), see `hashing.cached_sha256`.
    """
    where = art.path.name
    if not isinstance(art.files, dict) or not art.files:
        return f"{where}: its manifest has no file list (written by an older compress)"
    try:
        recorded = {str(rel): (int(want["size"]), str(want["sha256"])) for rel, want in art.files.items()}
    except (TypeError, KeyError, ValueError):
        return f"{where}: its manifest's file list is unreadable"
    for rel, (size, _) in recorded.items():
        path = art.path / rel
        if not path.is_file():
            return f"{where}/{rel}: missing"
        if (actual := path.stat().st_size) != size:
            return f"{where}/{rel}: size {actual} != recorded {size}"
    extra = sorted(set(model_files(art.path)) - set(recorded))
    if extra:
        return f"{where}/{extra[0]}: not one of the files recorded at commit"
    for rel, (_, sha) in recorded.items():
        digest = cached_sha256(art.path / rel, cache_dir)
        if digest != sha:
            return f"{where}/{rel}: sha256 {digest[:12]}... != recorded {sha[:12]}..."
    return None


def load_manifest(folder: Path) -> Artifact | None:
    """The artifact `folder`'s manifest describes (its files unchecked), or None when there is none readable."""
    try:
        art = Artifact.from_json(json.loads((folder / MANIFEST).read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return Artifact.from_json({**art.to_json(), "path": str(folder)})


def read_artifact(folder: Path) -> Artifact | None:
    """The artifact stored in `folder`, or None when the folder is missing or incomplete."""
    art = load_manifest(folder)
    return art if art is not None and art.main.exists() else None


def temp_folder(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_artifact(tmp: Path, final: Path, art: Artifact) -> Artifact:
    """Write the manifest into `tmp`, then swap `tmp` into place as `final`."""
    art = Artifact.from_json(
        {
            **art.to_json(),
            "path": str(final),
            # a linked source's weights are in the folder it names (families/causal_lm/linked.py): its size counts them
            "size_bytes": folder_size(tmp) + int(art.info.get("linked_bytes", 0)),
            "files": record_files(tmp),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    write_json_atomic(tmp / MANIFEST, art.to_json())
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    return art
