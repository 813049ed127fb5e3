"""Reader for an image folder laid out as `root/<class>/*.jpg` (the torchvision ImageFolder layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """(files, labels, class names) of an image folder, classes in sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: image folder not found (expected root/<class>/<image files>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"{root}: no class sub-folders (expected root/<class>/<image files>)")
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                files.append(file)
                labels.append(index)
    if not files:
        raise ConfigError(f"{root}: no images with suffix {', '.join(IMAGE_SUFFIXES)}")
    return files, np.asarray(labels, dtype=np.int64), classes


def load_images(files: list[Path], size: int) -> np.ndarray:
    """Decode and resize images to (N, size, size, 3) uint8, RGB."""
    from PIL import Image

    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, file in enumerate(files):
        with Image.open(file) as img:
            out[i] = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))
    return out
