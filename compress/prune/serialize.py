"""Saving a pruned torch module.

A pruned model's layer widths no longer follow its class's constructor, so a state dict alone cannot
rebuild it. We pickle the whole module (`torch.save(model)`) and load it with `weights_only=False`: the
model's class must be importable where it is loaded, and the file must come from a trusted source
(unpickling runs code). The file is written under a temporary name and renamed when complete, so a killed
run never leaves a half file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

MODULE_FILE = "model.pt"


def save_module(model: nn.Module, folder: str | os.PathLike[str]) -> Path:
    """Write `model` (the whole module) to `folder/model.pt` atomically; return the file path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODULE_FILE
    tmp = path.with_name(path.name + ".tmp")
    torch.save(model, tmp)
    os.replace(tmp, path)
    return path


def load_module(folder: str | os.PathLike[str], map_location: str = "cpu") -> nn.Module:
    """Load a module written by `save_module` (trusted files only: this unpickles)."""
    return torch.load(Path(folder) / MODULE_FILE, map_location=map_location, weights_only=False)
