"""Structured pruning: CNNs via torch-pruning (`vision`), decoders over their architecture map (`decoder`).

Only the options load eagerly; the pruning code (and torch) loads on first use, so validating a pipeline
stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from compress.prune.options import PruneOptions, PruneTarget

_LAZY = {
    "LayerChannels": "vision",
    "PruneReport": "vision",
    "prune_vision": "vision",
    "DecoderPruneReport": "decoder",
    "planned_sizes": "decoder",
    "prune_decoder": "decoder",
    "load_module": "serialize",
    "save_module": "serialize",
}

__all__ = ["PruneOptions", "PruneTarget", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"compress.prune.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'compress.prune' has no attribute {name!r}")
