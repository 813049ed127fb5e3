"""Image preprocessing: resize, grey -> 3 channels, normalise. One definition serves training,
calibration, evaluation and export parity, so every backend sees the same tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    size: int
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, channels, size, size)."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0)  # a copy: the source may be read-only
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and self.channels == 1:
            x = x.mean(dim=1, keepdim=True)
        mean = torch.tensor(self.mean[: self.channels]).view(1, -1, 1, 1)
        std = torch.tensor(self.std[: self.channels]).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous().numpy()
