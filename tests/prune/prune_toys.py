"""Toy models for the pruning tests: one per graph shape torch-pruning must couple (imported by tests)."""

from __future__ import annotations

import torch
from torch import nn


class DepthwiseResidualNet(nn.Module):
    """Stem, an inverted-residual block (1x1 expand, depthwise 3x3, 1x1 project, residual add), a grouped
    conv (groups=2) and a linear classifier: the three couplings a CNN pruner must get right."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.grouped = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, groups=2), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.depthwise(self.expand(x)))  # residual: stem and project outputs couple
        x = self.grouped(x)
        return self.head(x.mean(dim=(2, 3)))  # (B, 32) -> (B, classes)


class TwoConvNet(nn.Module):
    """conv1 -> BN -> ReLU -> conv2 -> pool -> fc: one prunable group (conv1's 16 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 4, 1, bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Give BatchNorm layers non-trivial statistics so a wrongly sliced BN would change outputs."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Indices of `original`'s output rows that survive in `pruned` (rows are copied, not changed)."""
    flat_o, flat_p = original.flatten(1), pruned.flatten(1)
    return sorted(int((flat_o - row).abs().sum(1).argmin()) for row in flat_p)


def tiny_net() -> DepthwiseResidualNet:
    torch.manual_seed(0)
    net = DepthwiseResidualNet().eval()
    randomise_batchnorm(net)
    return net


def _divisible(value: float, divisor: int = 8) -> int:
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = round(cin * expand)
        self.use_res = stride == 1 and cin == cout
        layers = [_conv_bn_relu(cin, hidden, kernel=1)] if expand != 1 else []
        layers += [
            _conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) with torchvision's module names, for the fast tests; the slow test
    uses the project's built-in copy (compress/families/vision/models/mobilenet_v2.py) with real weights."""

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        settings = [
            (1, 16, 1, 1),
            (6, 24, 2, 2),
            (6, 32, 3, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 1),
            (6, 160, 3, 2),
            (6, 320, 1, 1),
        ]
        cin = _divisible(32 * width)
        features: list[nn.Module] = [_conv_bn_relu(3, cin, stride=2)]
        for t, c, n, s in settings:
            cout = _divisible(c * width)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(_conv_bn_relu(cin, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=(2, 3))  # (B, 1280)
        return self.classifier(x)
