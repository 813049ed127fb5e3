"""The chain the pipeline runs: prune a CNN with torch-pruning, then distill it from its unpruned self."""

from __future__ import annotations

import copy

import torch
from torch import nn

from compress.distill import DistillOptions, FeaturePair, distill, mean_kl
from compress.prune import PruneOptions, prune_vision


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))  # (B, 64) -> (B, 5)


def test_pruned_student_recovers_towards_its_teacher() -> None:
    torch.manual_seed(0)
    teacher = SmallCNN().eval()
    with torch.no_grad():
        teacher.head.weight.mul_(10.0)  # confident teacher
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(6):
        x = torch.randn(8, 3, 8, 8, generator=gen)
        data.append((x, torch.zeros(8, dtype=torch.long)))  # labelled below, once BN is calibrated
    # Give BatchNorm the statistics of this data (a trained teacher would have them): the student trains
    # in train mode, so its running statistics move to the data's; a random teacher's defaults would not.
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    teacher.train()
    with torch.no_grad():
        for x, _ in data:
            teacher(x)
    teacher.eval()
    data = [(x, teacher(x).argmax(-1).detach()) for x, _ in data]
    student = copy.deepcopy(teacher)
    report = prune_vision(student, data[0][0][:1], PruneOptions(target={"channels": 0.5}))
    assert report.params_after < 0.5 * report.params_before
    pruned_kl = mean_kl(student, teacher, data, "classification")
    opts = DistillOptions(
        max_steps=60,
        lr=3e-3,
        alpha=0.8,
        features=(FeaturePair(student="features.7", teacher="features.7"),),  # 32 vs 64 channels
        feature_weight=0.1,
    )
    distill(student, teacher, data, opts)
    # Distillation must at least halve the KL the pruning caused (seen: 0.0132 -> 0.0026 in 60 steps).
    after = mean_kl(student, teacher, data, "classification")
    assert after < pruned_kl / 2, (pruned_kl, after)
