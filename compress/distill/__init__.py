"""Knowledge distillation: a frozen teacher's soft targets (and optionally its features) train a student.

The training loop (and torch) load on first use, so validating a pipeline stays light.
"""

from __future__ import annotations

from typing import Any

from compress.distill.options import DistillOptions, FeaturePair

_LAZY = {"DistillProgress", "DistillReport", "distill", "mean_kl", "total_steps"}

__all__ = ["DistillOptions", "FeaturePair", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module("compress.distill.distill")
        # importing the submodule bound the package attribute `distill` to it; rebind the public names
        globals().update({lazy: getattr(module, lazy) for lazy in _LAZY})
        return globals()[name]
    raise AttributeError(f"module 'compress.distill' has no attribute {name!r}")
