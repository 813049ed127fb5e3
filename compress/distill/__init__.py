"""Knowledge distillation: a frozen teacher's soft targets (and optionally its features) train a student."""

from compress.distill.distill import DistillProgress, DistillReport, distill, mean_kl, total_steps
from compress.distill.options import DistillOptions, FeaturePair

__all__ = [
    "DistillOptions",
    "DistillProgress",
    "DistillReport",
    "FeaturePair",
    "distill",
    "mean_kl",
    "total_steps",
]
