"""The vision task: labelled image subsets, their batches, top-1/top-5 evaluation and the comparison.

The primary metric is top-1 accuracy in percent (higher is better); a drop is measured in points.
`agreement` is the share of evaluation images whose top-1 class is the baseline's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from compress.families.base import Evaluation, QualityMetric
from compress.families.vision.options import VisionDataOptions
from compress.sources import resolve_path

if TYPE_CHECKING:
    import torch

    from compress.backends import Session
    from compress.data.datasets import LabelledImages
    from compress.data.transforms import Preprocess
    from compress.progress import Reporter

METRIC_NAMES = ("top1", "top5")
QUALITY = QualityMetric(
    "top1",
    "points",
    "top1_drop",
    higher_is_better=True,
    alias="top1_drop_max",
    detail="top-1 {ours:.2f}% vs {theirs:.2f}%",
)
COMPARISONS = (("top1_drop", "Δtop1 (points)", -1), ("agreement", "top-1 agreement %", 1))
ROLES = ("train", "calibration", "evaluation")
Problems = list[tuple[tuple[str | int, ...], str]]


def dataset_problems(d: VisionDataOptions, file: Path) -> Problems:
    """The definition parses, every split named exists, and its files are where the root says."""
    from compress.data.datasets import DatasetDefinition, IdxFiles, dataset_root
    from compress.errors import ConfigError
    from compress.yamlsrc import load_yaml

    try:
        definition = DatasetDefinition.model_validate(load_yaml(file).data)
    except ConfigError as exc:
        return [(("data", "dataset"), str(exc))]
    except ValueError as exc:  # pydantic's ValidationError
        return [(("data", "dataset"), f"{file}: invalid dataset definition: {exc}".replace("\n", " "))]
    root = dataset_root(definition, d.root)
    where = ("data", "root") if d.root else ("data", "dataset")
    hint = f"; {definition.install_hint}" if definition.install_hint else ""
    if not root.is_dir():
        return [(where, f"dataset root {root} does not exist{hint}")]
    problems: Problems = []
    missing: list[str] = []
    for role in ROLES:
        ref = getattr(d, role)
        if ref is None:
            continue
        entry = definition.splits.get(ref.split)
        if entry is None:
            allowed = ", ".join(definition.splits)
            problems.append((("data", role, "split"), f"'{ref.split}': not a split of {file}; allowed: {allowed}"))
            continue
        if definition.format == "idx":
            files = (entry.images, entry.labels) if isinstance(entry, IdxFiles) else ()
        else:
            files = (entry if isinstance(entry, str) else ref.split,)
        missing += [name for name in files if not (root / name).exists() and name not in missing]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        problems.append((where, f"dataset root {root} lacks {shown}{hint}"))
    return problems


def load_subsets(d: VisionDataOptions, base_dir: Path, input_size: int) -> dict[str, LabelledImages]:
    """The seeded subsets of each role `d` sets, drawn from the splits of its dataset definition."""
    from compress.data.datasets import DatasetDefinition, SubsetRequest, dataset_root, load_split, select_subsets
    from compress.yamlsrc import load_yaml

    file = resolve_path(d.dataset, base_dir)
    located = load_yaml(file)
    try:
        definition = DatasetDefinition.model_validate(located.data)
    except Exception as exc:  # pydantic ValidationError: name the file
        raise ValueError(f"{file}: invalid dataset definition: {exc}") from None
    root = dataset_root(definition, d.root)
    requests = [SubsetRequest(role, ref.split, ref.samples) for role in ROLES if (ref := getattr(d, role)) is not None]
    splits = {r.split: load_split(definition, r.split, root, input_size) for r in requests}
    return select_subsets(splits, requests, d.seed)


def batches(
    data: LabelledImages, preprocess: Preprocess, batch_size: int, *, seed: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs float32 (B, C, S, S), labels) over a subset; shuffled when `seed` is given."""
    order = np.arange(len(data)) if seed is None else np.random.default_rng(seed).permutation(len(data))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield preprocess(data.images[idx]), data.labels[idx]


def train_batches(data: LabelledImages, preprocess: Preprocess, batch_size: int, *, seed: int = 0) -> _TrainBatches:
    """Map-style batches: batch `i` is the same on every access (a fixed seeded permutation cut into batches),
    which is what a resumable training loop that indexes batches by step needs (`compress.distill`)."""
    order = np.random.default_rng(seed).permutation(len(data))
    index = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]  # (B,) index each
    return _TrainBatches(data, preprocess, index)


class _TrainBatches(Sequence):
    """Batches of a labelled subset, preprocessed when indexed (the whole set at 224 px would not fit)."""

    def __init__(self, data: LabelledImages, preprocess: Preprocess, index: list[np.ndarray]) -> None:
        self._data, self._preprocess, self._index = data, preprocess, index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        import torch

        idx = self._index[i]
        return torch.from_numpy(self._preprocess(self._data.images[idx])), torch.from_numpy(self._data.labels[idx])


def evaluate(
    session: Session,
    data: LabelledImages,
    preprocess: Preprocess,
    bs: int,
    reporter: Reporter,
    label: str,
) -> Evaluation:
    """Top-1 and top-5 accuracy (%) of `session` on `data`; predictions are the top-1 classes."""
    correct1 = correct5 = 0
    predictions = np.empty(len(data), dtype=np.int64)
    confidence = np.empty(len(data), dtype=np.float32)  # softmax max, for calibration (ECE)
    with reporter.task(f"evaluate {label}", total=len(data)) as task:
        for i, (x, y) in enumerate(batches(data, preprocess, bs)):
            logits = session.run({"input": x})[0]
            top5 = np.argsort(-logits, axis=1)[:, :5]
            predictions[i * bs : i * bs + len(y)] = top5[:, 0]
            shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
            confidence[i * bs : i * bs + len(y)] = 1.0 / shifted.sum(axis=1)  # max of the softmax
            correct1 += int((top5[:, 0] == y).sum())
            correct5 += int((top5 == y[:, None]).any(axis=1).sum())
            task.advance(len(y), info=f"running top1 {100 * correct1 / (i * bs + len(y)):.1f}%")
    n = len(data)
    metrics = {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "samples": n}
    return Evaluation(metrics, predictions, samples={"labels": data.labels, "confidence": confidence})


def compare(result: Evaluation, baseline: Evaluation) -> dict[str, float]:
    return {
        "top1_drop": baseline.metrics["top1"] - result.metrics["top1"],
        "agreement": 100.0 * float((result.predictions == baseline.predictions).mean()),
    }
