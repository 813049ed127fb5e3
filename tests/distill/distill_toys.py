"""Tiny teachers, students and data for the distillation tests (imported by tests)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, hidden: int, dropout: float = 0.0, inputs: int = 12, classes: int = 6) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def teacher_and_data(batches: int = 8, batch_size: int = 16, seed: int = 0) -> tuple[MLP, list]:
    """A random teacher with sharpened logits and batches labelled by its own argmax."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher = MLP(64).eval()
    with torch.no_grad():
        teacher.head.weight.mul_(4.0)
    data = []
    for _ in range(batches):
        x = torch.randn(batch_size, 12, generator=gen)
        with torch.no_grad():
            labels = teacher(x).argmax(-1)
        data.append((x, labels))
    return teacher, data
