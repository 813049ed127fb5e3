"""Distillation checkpoints: everything needed to continue a killed run bit-for-bit.

Model, projection heads, optimizer, scheduler, step and RNG states are written to a temporary file and
renamed, so a kill during the write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "distill-checkpoint.pt"


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT_FILE
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    path = folder / CHECKPOINT_FILE
    if not path.exists():
        return None
    # Only tensors, numbers, strings and containers are stored, so the safe loader suffices.
    return torch.load(path, map_location="cpu", weights_only=True)
