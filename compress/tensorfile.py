"""Tensors on disk as safetensors: loading one reads numbers, never runs code (a pickle would).

`write_tensors` writes atomically (temporary name, then rename) and stores a tensor once when several
names share it (tied weights: safetensors refuses shared storage); `read_tensors` gives every name back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from compress.errors import StageError

_ALIASES = "compress.aliases"


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` to the safetensors file `path`; `metadata` is kept as strings beside them."""
    from safetensors.torch import save_file

    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}  # (storage, offset, shape, stride, dtype) -> first name
    storages: set[int] = set()
    for name, tensor in tensors.items():
        t = tensor.detach().cpu()
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and view in seen:
            aliases[name] = seen[view]
            continue
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages or not t.is_contiguous():
            t = t.contiguous().clone()  # another view of a stored tensor: safetensors keeps one owner each
        seen[view] = name
        storages.add(t.untyped_storage().data_ptr())
        unique[name] = t
    meta = {**(metadata or {}), _ALIASES: json.dumps(aliases)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(unique, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a file written by `write_tensors` (aliases restored) and its metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        for alias, name in json.loads(meta.pop(_ALIASES, "{}")).items():
            tensors[alias] = tensors[name]
    except (OSError, SafetensorError, ValueError, KeyError, AttributeError) as exc:
        raise StageError(f"{path}: not a readable tensor file ({type(exc).__name__}: {exc})") from None
    return tensors, meta
