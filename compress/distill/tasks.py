"""Distillation tasks: how one kind of model's batches are split, fed and scored.

A model family declares its task by name (`Adapter.distill_task`); the loop (`compress.distill.distill`) and
the `distill` stage look it up here, so neither names a family. Adding a task = one class + one entry in
`TASKS` (and in the `task` choices of `compress.distill.options.DistillOptions`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from compress.distill.losses import next_token_ce
from compress.errors import StageError

Batch = Any  # what a task's `split` takes; see each task's docstring


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and isinstance(output[0], torch.Tensor):
        return output[0]
    raise StageError(f"distill: cannot find logits in a model output of type {type(output).__name__}")


class DistillTask:
    """Feeds and scores one kind of model; subclasses give every method."""

    name: str

    def split(self, batch: Batch) -> tuple[Any, Any]:
        """(model inputs, targets) of a batch."""
        raise NotImplementedError

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """The model's logits (..., V) on `inputs`."""
        raise NotImplementedError

    def mask(self, targets: Any) -> torch.Tensor | None:
        """Which logit rows count in the KL (None: all)."""
        return None

    def task_loss(self, logits: torch.Tensor, targets: Any) -> torch.Tensor:
        """The hard-target loss the (1 - alpha) term weighs."""
        raise NotImplementedError

    def rows(self, batches: Sequence[Batch]) -> dict[str, int]:
        """What a mean over `batches` is taken over, for a report: {unit: count}."""
        raise NotImplementedError

    def counts(self, targets: Any) -> tuple[float, float]:
        """(rows the KL averages over, rows the task loss averages over) of one batch's targets: a part of a
        batch weighs its loss terms by its share of these (`compress.distill.shards`)."""
        raise NotImplementedError


class Classification(DistillTask):
    """Batches are (inputs, labels); the task loss is cross-entropy with the labels; one row per sample."""

    name = "classification"

    def split(self, batch: Batch) -> tuple[Any, Any]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise StageError("distill(classification): a batch must be (inputs, labels)")
        return batch[0], batch[1]

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        return _logits(model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs))

    def task_loss(self, logits: torch.Tensor, targets: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float(), targets)

    def rows(self, batches: Sequence[Batch]) -> dict[str, int]:
        return {"images": sum(len(self.split(b)[1]) for b in batches)}

    def counts(self, targets: Any) -> tuple[float, float]:
        return float(len(targets)), float(len(targets))


class CausalLM(DistillTask):
    """Batches are input_ids or {"input_ids", "attention_mask"?}; the task loss is next-token cross-entropy
    on the same text; one KL row per non-padding token."""

    name = "causal-lm"

    def split(self, batch: Batch) -> tuple[Any, Any]:
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise StageError("distill(causal-lm): a batch must be input_ids or a dict with 'input_ids'")
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        return inputs, inputs

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        return _logits(model(**inputs, use_cache=False))

    def mask(self, targets: Any) -> torch.Tensor | None:
        return targets.get("attention_mask")

    def task_loss(self, logits: torch.Tensor, targets: Any) -> torch.Tensor:
        return next_token_ce(logits, targets["input_ids"], targets.get("attention_mask"))

    def rows(self, batches: Sequence[Batch]) -> dict[str, int]:
        return {"tokens": sum(int(self.split(b)[0]["input_ids"].numel()) for b in batches)}

    def counts(self, targets: Any) -> tuple[float, float]:
        ids, mask = targets["input_ids"], targets.get("attention_mask")  # (B, T) each
        if mask is None:
            return float(ids.numel()), float(ids.shape[0] * (ids.shape[1] - 1))
        return float(mask.sum()), float((mask[:, 1:] != 0).sum())  # as soft_kl and next_token_ce count


TASKS: dict[str, type[DistillTask]] = {task.name: task for task in (Classification, CausalLM)}


def distill_task(name: str) -> DistillTask:
    """The task registered as `name`; ValueError naming the known ones otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown distillation task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]()
