"""Distillation checkpoints: everything needed to continue a killed run bit-for-bit.

Model, projection heads, optimizer, scheduler, step and RNG states go into one safetensors file: the
tensors as tensors, everything else (numbers, strings, lists, tuples, dicts with int keys) as JSON in its
metadata. Reading it never unpickles, so a file planted in the cache cannot run code. Written to a
temporary file and renamed, so a kill during the write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from compress.errors import StageError
from compress.tensorfile import read_tensors, write_tensors

CHECKPOINT_FILE = "distill-checkpoint.safetensors"
_STRUCTURE, _FORMAT = "compress.structure", "compress.distill-checkpoint/1"


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT_FILE
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(state, "", tensors)
    write_tensors(path, tensors, {"format": _FORMAT, _STRUCTURE: json.dumps(structure)})
    return path


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    path = folder / CHECKPOINT_FILE
    if not path.exists():
        return None
    tensors, meta = read_tensors(path)
    if meta.get("format") != _FORMAT:
        raise StageError(f"{path}: not a {_FORMAT} checkpoint; delete it to start afresh")
    return _unflatten(json.loads(meta[_STRUCTURE]), tensors)


def _flatten(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for `value`, its tensors moved into `tensors` under their path (tuples and int keys tagged)."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[k, _flatten(v, f"{key}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_flatten(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
        return {"tuple" if isinstance(value, tuple) else "list": items}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"distill checkpoint: cannot store {type(value).__name__} at {key or '/'}")


def _unflatten(node: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    ((kind, body),) = node.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "dict":
        return {k: _unflatten(v, tensors) for k, v in body}
    if kind in ("list", "tuple"):
        items = [_unflatten(v, tensors) for v in body]
        return tuple(items) if kind == "tuple" else items
    return body
