"""`calibrator: per-tensor`: each activation takes the minmax, entropy or percentile range whose 8-bit
quantization error on the calibration samples is least.

Why: one calibrator for every tensor is a compromise. Percentile and entropy clip the long tails of wide
activations (good there) but also clip tensors whose largest values matter; minmax keeps every value but
spends its levels on outliers. The error of each candidate range is estimated from the entropy pass's
histogram (512 bins over [-t, t], t the largest |value|): a bin inside the range costs its count × step²/12
(uniform rounding), a bin outside costs count × (step²/12 + the squared distance of its centre to the range).
ONNX Runtime has no per-tensor choice of calibrator (NNCF's range estimators target OpenVINO), so it is ours.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CANDIDATES = ("percentile", "entropy", "minmax")  # ties go to the first
#: joins the int8 stage's cache key: a change in how the error is estimated makes other graphs
VERSION = 1


def quantization_mse(hist: np.ndarray, edges: np.ndarray, low: float, high: float, *, symmetric: bool) -> float:
    """Mean squared 8-bit quantization error of values distributed as `hist` (counts over `edges`) with the
    range [low, high] as ONNX Runtime turns it into a scale: uint8 asymmetric over [min(low, 0), max(high, 0)],
    or int8 symmetric over ±max(|low|, |high|)."""
    if symmetric:
        top = max(abs(low), abs(high))
        rmin, rmax, step = -top, top, 2 * top / 254
    else:
        rmin, rmax = min(low, 0.0), max(high, 0.0)
        step = (rmax - rmin) / 255
    counts = np.asarray(hist, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    outside = np.maximum(np.maximum(rmin - centres, centres - rmax), 0.0)
    total = counts.sum()
    return float((counts * (outside**2 + step**2 / 12)).sum() / total) if total else 0.0


def choose_ranges(candidates: dict[str, Any], *, symmetric: bool) -> tuple[dict[str, tuple[Any, Any]], dict[str, Any]]:
    """Per tensor, the candidate range (lowest, highest) with the least error, and a record of the choice.

    `candidates` maps each calibrator of CANDIDATES to its TensorsData; the entropy one carries the
    histograms (`hist`, `bins`). Returns ({tensor: (lowest, highest)},
    {tensor: {"chosen": name, "range": [lowest, highest], "mse": {calibrator: error}}}).
    """
    histograms = candidates["entropy"].data
    chosen: dict[str, tuple[Any, Any]] = {}
    record: dict[str, Any] = {}
    for name, entropy in histograms.items():
        errors = {}
        for calibrator in CANDIDATES:
            low, high = (float(np.ravel(v)[0]) for v in candidates[calibrator].data[name].range_value)
            errors[calibrator] = quantization_mse(entropy.hist, entropy.bins, low, high, symmetric=symmetric)
        best = min(CANDIDATES, key=lambda c: errors[c])
        chosen[name] = candidates[best].data[name].range_value
        low, high = (float(np.ravel(v)[0]) for v in chosen[name])
        record[name] = {"chosen": best, "range": [low, high], "mse": {c: float(f"{e:.6g}") for c, e in errors.items()}}
    return chosen, record
