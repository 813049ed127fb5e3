"""ConvNeXt-T (Liu et al. 2022, arXiv 2201.03545) with torchvision's module names.

`features.0` stem (4x4 conv + LayerNorm2d), `features.1,3,5,7` stages of CNBlocks (`block.0` depthwise 7x7,
`block.2` LayerNorm, `block.3` / `block.5` the MLP, `layer_scale`), `features.2,4,6` downsampling
(LayerNorm2d + 2x2 conv), `classifier.{0,2}`: torchvision's `convnext_tiny` state dict loads with every
key matched; `from_timm` renames timm's `convnext_tiny` (`stem`, `stages.S.blocks.N`, `gamma`, `head.fc`).
"""

from __future__ import annotations

import re

import torch
from torch import nn

_EPS = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # normalised as (B, H, W, C)


class Permute(nn.Module):
    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class CNBlock(nn.Module):
    resizable_parameters = ("layer_scale",)  # (C, 1, 1): pruning resizes it with C (compress.prune.serialize)

    def __init__(self, dim: int, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim),  # depthwise
            Permute((0, 2, 3, 1)),  # (B, H, W, C): LayerNorm and the MLP act on channels
            nn.LayerNorm(dim, eps=_EPS),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute((0, 3, 1, 2)),  # back to (B, C, H, W)
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * self.block(x)


class ConvNeXt(nn.Module):
    def __init__(self, dims: tuple[int, ...], depths: tuple[int, ...], num_classes: int = 1000) -> None:
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=_EPS))
        features: list[nn.Module] = [stem]
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            if i:
                features.append(nn.Sequential(LayerNorm2d(dims[i - 1], eps=_EPS), nn.Conv2d(dims[i - 1], dim, 2, 2)))
            features.append(nn.Sequential(*(CNBlock(dim) for _ in range(depth))))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            LayerNorm2d(dims[-1], eps=_EPS), nn.Flatten(1), nn.Linear(dims[-1], num_classes)
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 768, H/32, W/32)
        return self.classifier(nn.functional.adaptive_avg_pool2d(x, 1))  # (B, 768, 1, 1) -> (B, classes)


def convnext_tiny(num_classes: int = 1000) -> ConvNeXt:
    return ConvNeXt((96, 192, 384, 768), (3, 3, 9, 3), num_classes)


_BLOCK = {"conv_dw": "block.0", "norm": "block.2", "mlp.fc1": "block.3", "mlp.fc2": "block.5"}
_TOP = {"stem.0": "features.0.0", "stem.1": "features.0.1", "head.norm": "classifier.0", "head.fc": "classifier.2"}


def from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's `convnext_tiny` keys -> ours; its per-block `gamma` (C,) is our `layer_scale` (C, 1, 1)."""
    out = {}
    for key, value in state.items():
        module, _, attr = key.rpartition(".")
        if m := re.match(r"^stages\.(\d+)\.blocks\.(\d+)$", module):  # a block's own parameter: gamma
            module, attr, value = f"features.{2 * int(m[1]) + 1}.{m[2]}", "layer_scale", value.reshape(-1, 1, 1)
        elif m := re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$", module):
            module = f"features.{2 * int(m[1]) + 1}.{m[2]}.{_BLOCK.get(m[3], m[3])}"
        elif m := re.match(r"^stages\.(\d+)\.downsample\.(\d)$", module):
            module = f"features.{2 * int(m[1])}.{m[2]}"
        else:
            module = _TOP.get(module, module)
        out[f"{module}.{attr}"] = value
    return out
