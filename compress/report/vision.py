"""The numbers behind the vision pictures (confusion matrices, per-class accuracy, flips, calibration) and
the pictures themselves, from per-sample predictions, labels and top-1 confidences."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from compress.report.figures import png_bytes, pyplot

ECE_BINS = 15


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) counts: row = true class, column = predicted class."""
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    cm = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(cm, (labels.astype(np.int64), predictions.astype(np.int64)), 1)
    return cm


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Top-1 % per true class (NaN for a class without samples)."""
    totals = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, 100.0 * np.diag(cm) / totals, np.nan)


def flipped(labels: np.ndarray, baseline: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Indices of the samples the baseline gets right and the compressed model gets wrong."""
    return np.flatnonzero((baseline == labels) & (predictions != labels))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE in %: sum over equal-width confidence bins of |accuracy - mean confidence| weighted by the bin's
    share of samples (Guo et al. 2017). Bin edges are right-closed: (0, 1/bins], ..., ((bins-1)/bins, 1]."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if len(confidence) == 0:
        raise ValueError("expected_calibration_error of no samples")
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return 100.0 * float(ece)


def confusion_figure(cm: np.ndarray, base_cm: np.ndarray | None, names: Sequence[str], title: str) -> bytes:
    """The confusion matrix, and beside it its difference to the baseline's (red: more, blue: fewer)."""
    plt = pyplot()
    panels = 1 if base_cm is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 5), dpi=100, squeeze=False)
    _matrix(axes[0][0], cm, names, "Blues", f"{title}: confusion (rows true)")
    if base_cm is not None:
        diff = cm - base_cm
        bound = max(1, int(np.abs(diff).max()))
        _matrix(axes[0][1], diff, names, "RdBu_r", "minus the baseline's", vmin=-bound, vmax=bound)
    return png_bytes(fig)


def _matrix(ax, values: np.ndarray, names: Sequence[str], cmap: str, title: str, **scale: float) -> None:
    ax.imshow(values, cmap=cmap, **scale)
    ticks = range(len(values))
    ax.set_xticks(ticks, [n[:10] for n in names] if names else ticks, rotation=60, fontsize=7, ha="right")
    ax.set_yticks(ticks, [n[:10] for n in names] if names else ticks, fontsize=7)
    for (i, j), v in np.ndenumerate(values):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=6)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("predicted", fontsize=8)


def flips_figure(
    indices: np.ndarray,
    images: Callable[[np.ndarray], np.ndarray],
    labels: np.ndarray,
    baseline: tuple[np.ndarray, np.ndarray],
    compressed: tuple[np.ndarray, np.ndarray],
    names: Sequence[str],
    limit: int = 24,
) -> bytes:
    """A grid of flipped samples: true class, the baseline's and the compressed model's (class, confidence)."""
    plt = pyplot()
    shown = indices[:limit]
    cols = min(6, len(shown))
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.5 * rows), dpi=100, squeeze=False)
    pics = images(shown)
    name = (lambda c: names[c][:12]) if names else str
    for ax in axes.flat:
        ax.axis("off")
    for ax, i, pic in zip(axes.flat, shown, pics, strict=False):
        ax.imshow(pic, cmap="gray" if pic.ndim == 2 else None)
        (bp, bc), (cp, cc) = baseline, compressed
        ax.set_title(
            f"#{i} true {name(labels[i])}\nbase {name(bp[i])} {bc[i]:.2f}\nnow {name(cp[i])} {cc[i]:.2f}", fontsize=7
        )
    return png_bytes(fig)


def reliability_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], bins: int = ECE_BINS) -> bytes:
    """Accuracy per confidence bin for each artifact: the diagonal is perfect calibration."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for label, (confidence, correct) in curves.items():
        which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
        xs = [(b + 0.5) / bins for b in range(bins) if (which == b).any()]
        ys = [correct[which == b].mean() for b in range(bins) if (which == b).any()]
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    ax.set_title(f"reliability ({bins} bins)", fontsize=9)
    return png_bytes(fig)
