"""Artifact: a model at one point of the pipeline, stored as a folder with an `artifact.json` manifest.

Folders are written under a temporary name and renamed when complete (`commit_artifact`), so a killed
run never leaves a half-written artifact that a later run would trust.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

Format = Literal["torch", "onnx", "engine"]
MANIFEST = "artifact.json"


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
    size_bytes: int = 0
    created: str = ""

    @property
    def main(self) -> Path:
        return self.path / self.file

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


def read_artifact(folder: Path) -> Artifact | None:
    """The artifact stored in `folder`, or None when the folder is missing or incomplete."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        art = Artifact.from_json(json.loads(manifest.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError):
        return None
    art = Artifact.from_json({**art.to_json(), "path": str(folder)})
    return art if art.main.exists() else None


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
            "size_bytes": folder_size(tmp),
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


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
