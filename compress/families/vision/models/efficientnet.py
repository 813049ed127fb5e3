"""EfficientNet-B0 (Tan & Le 2019, arXiv 1905.11946) with torchvision's module names.

`features.0` stem, `features.1..7` stages of MBConv blocks (`block.N` = [expand,] depthwise,
squeeze-excitation `fc1`/`fc2`, project), `features.8` head conv, `classifier.1`: torchvision's
`efficientnet_b0` state dict loads with every key matched; `from_timm` renames timm's `efficientnet_b0`
(`conv_stem`, `blocks.S.N.conv_pw`...). timm's `tf_efficientnet_b0` has the same keys but TensorFlow's
"same" padding and BatchNorm eps 1e-3: its weights load here, computing slightly different outputs.
"""

from __future__ import annotations

import re

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.SiLU(inplace=True)] if act else []))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = nn.functional.adaptive_avg_pool2d(x, 1)  # (B, C, 1, 1)
        return x * torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(scale))))


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers = [_conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [
            _conv_bn(hidden, hidden, kernel, stride, groups=hidden),  # depthwise
            SqueezeExcitation(hidden, max(1, cin // 4)),
            _conv_bn(hidden, cout, 1, act=False),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res_connect else self.block(x)


# (expand ratio, kernel, stride, output channels, repeats) of B0, the paper's Table 1.
_B0 = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4))
_B0 += ((6, 3, 1, 320, 1),)


class EfficientNet(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        features: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        cin = 32
        for expand, kernel, stride, cout, repeats in _B0:
            stage = [
                MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand) for i in range(repeats)
            ]
            features.append(nn.Sequential(*stage))
            cin = cout
        features.append(_conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 1280, H/32, W/32)
        return self.classifier(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))  # (B, 1280) -> (B, classes)


def efficientnet_b0(num_classes: int = 1000) -> EfficientNet:
    return EfficientNet(num_classes)


_FIRST_STAGE = {"conv_dw": "0.0", "bn1": "0.1", "se.conv_reduce": "1.fc1", "se.conv_expand": "1.fc2"}
_FIRST_STAGE |= {"conv_pw": "2.0", "bn2": "2.1"}
_STAGES = {"conv_pw": "0.0", "bn1": "0.1", "conv_dw": "1.0", "bn2": "1.1", "se.conv_reduce": "2.fc1"}
_STAGES |= {"se.conv_expand": "2.fc2", "conv_pwl": "3.0", "bn3": "3.1"}
_TOP = {"conv_stem": "features.0.0", "bn1": "features.0.1", "conv_head": "features.8.0", "bn2": "features.8.1"}
_TOP |= {"classifier": "classifier.1"}


def from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's `efficientnet_b0` keys -> ours: `blocks.S.N.<layer>` is `features.{S+1}.N.block.<index>`."""
    out = {}
    for key, value in state.items():
        module, _, attr = key.rpartition(".")
        if block := re.match(r"^blocks\.(\d+)\.(\d+)\.(.+)$", module):
            stage, index, layer = int(block[1]), block[2], block[3]
            layer = (_FIRST_STAGE if stage == 0 else _STAGES).get(layer, layer)
            module = f"features.{stage + 1}.{index}.block.{layer}"
        else:
            module = _TOP.get(module, module)
        out[f"{module}.{attr}"] = value
    return out
