"""Model sources for the N-process pipeline tests (`python:ddp_toys:plain_cnn`): CNNs without BatchNorm.

BatchNorm normalises with the statistics of each process's rows, so only a network without it trains to
the same weights on 2 processes x b rows as on 1 process x 2b rows (up to round-off).
"""

from __future__ import annotations

import time

import torch
from torch import nn


class PlainCNN(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:  # an "ImageNet" head, replaced for the task
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU()
        )  # fmt: skip
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))  # (B, 32) -> (B, classes)


class SlowCNN(PlainCNN):
    """Sleeps 20 ms per training forward, so that a test can kill a run in the middle of its distillation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            time.sleep(0.02)
        return super().forward(x)


def plain_cnn() -> nn.Module:
    torch.manual_seed(0)
    return PlainCNN()


def slow_cnn() -> nn.Module:
    torch.manual_seed(0)
    return SlowCNN()
