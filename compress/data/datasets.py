"""Dataset definitions (`calibration/*.yaml`) and disjoint train / calibration / evaluation subsets.

A definition names where a labelled image set lives and how it is laid out; a pipeline file points at a
definition and says which split and how many samples each role takes. Evaluation samples are reserved
first (the tail of a seeded permutation of their split); training and calibration draw from what is left,
so evaluation never overlaps either. Training and calibration may share images (calibrating on training
data is standard practice).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from compress.errors import ConfigError


class IdxFiles(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    images: str = Field(description="IDX images file, relative to the dataset root")
    labels: str = Field(description="IDX labels file, relative to the dataset root")


class DatasetDefinition(BaseModel):
    """A dataset definition file. Example (calibration/fashion-mnist.yaml):

    ```yaml
    name: fashion-mnist
    format: idx
    root: /usr/share/datasets/fashion-mnist
    root_env: COMPRESS_FASHION_MNIST
    splits:
      train: {images: train-images-idx3-ubyte.gz, labels: train-labels-idx1-ubyte.gz}
      test: {images: t10k-images-idx3-ubyte.gz, labels: t10k-labels-idx1-ubyte.gz}
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    format: Literal["idx", "image-folder"] = Field(
        description="idx: MNIST-style files; image-folder: root/<split>/<class>/*.jpg"
    )
    root: str = Field(description="default location of the files")
    root_env: str | None = Field(None, description="environment variable that overrides root")
    splits: dict[str, IdxFiles | str] = Field(description="split name -> IDX files, or sub-folder for image-folder")
    classes: list[str] | None = Field(None, description="class names in label order")
    install_hint: str | None = Field(None, description="what to install when the files are missing")
    licence: str | None = Field(None, description="the data's licence, for the report's data card")
    source: str | None = Field(None, description="where the data comes from (paper, URL, package)")


def dataset_card(file: Path, subsets: Mapping[str, LabelledImages]) -> dict[str, Any]:
    """The report's data card: the definition's facts and, per role, split, size and sha256."""
    from compress.yamlsrc import load_yaml

    definition = DatasetDefinition.model_validate(load_yaml(file).data)
    return {
        "dataset": definition.name,
        "definition": str(file),
        "licence": definition.licence or "not stated in the dataset definition",
        "source": definition.source or "not stated in the dataset definition",
        "classes": len(definition.classes or []) or None,
        "roles": {
            role: {"split": sub.split, "samples": len(sub), "sha256": sub.sha256} for role, sub in subsets.items()
        },
    }


@dataclass(frozen=True)
class LabelledImages:
    """A subset of one split: uint8 images (N, H, W[, C]), int64 labels and where they came from."""

    images: np.ndarray
    labels: np.ndarray
    split: str
    indices: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @cached_property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.images).tobytes())
        digest.update(np.ascontiguousarray(self.labels).astype("<i8").tobytes())
        return digest.hexdigest()


def dataset_root(definition: DatasetDefinition, override: str | None) -> Path:
    if override:
        return Path(override)
    if definition.root_env and os.environ.get(definition.root_env):
        return Path(os.environ[definition.root_env])
    return Path(definition.root)


def load_split(definition: DatasetDefinition, split: str, root: Path, image_size: int) -> LabelledImages:
    """Every image of one split. `image_size` is used by image folders, which are resized on load."""
    if split not in definition.splits:
        raise ConfigError(
            f"dataset '{definition.name}' has no split '{split}'; allowed: {', '.join(definition.splits)}"
        )
    entry = definition.splits[split]
    hint = f" ({definition.install_hint})" if definition.install_hint else ""
    if definition.format == "idx":
        from compress.data.idx import read_idx

        if not isinstance(entry, IdxFiles):
            raise ConfigError(f"dataset '{definition.name}': split '{split}' needs images and labels files")
        for file in (entry.images, entry.labels):
            if not (root / file).is_file():
                raise ConfigError(f"{root / file}: missing file of dataset '{definition.name}'{hint}")
        images, labels = read_idx(root / entry.images), read_idx(root / entry.labels).astype(np.int64)
        classes = definition.classes or [str(i) for i in range(int(labels.max()) + 1)]
    else:
        from compress.data.imagefolder import list_image_folder, load_images

        folder = root / (entry if isinstance(entry, str) else split)
        files, labels, found = list_image_folder(folder)
        images = load_images(files, image_size)
        classes = definition.classes or found
    if len(images) != len(labels):
        raise ConfigError(f"dataset '{definition.name}' split '{split}': {len(images)} images but {len(labels)} labels")
    return LabelledImages(images, labels, split, np.arange(len(labels)), tuple(classes))


@dataclass(frozen=True)
class SubsetRequest:
    role: str  # train | calibration | evaluation
    split: str
    samples: int | None  # None: all that is available


def select_subsets(
    splits: dict[str, LabelledImages], requests: list[SubsetRequest], seed: int
) -> dict[str, LabelledImages]:
    """Draw each role's samples so that evaluation never overlaps training or calibration."""
    out: dict[str, LabelledImages] = {}
    for split, full in splits.items():
        perm = np.random.default_rng(seed).permutation(len(full))
        evaluation = [r for r in requests if r.split == split and r.role == "evaluation"]
        others = [r for r in requests if r.split == split and r.role != "evaluation"]
        n_eval = 0
        for req in evaluation:
            n_eval = len(full) if req.samples is None else req.samples
            if n_eval > len(full) or (others and n_eval == len(full)):
                raise ConfigError(
                    f"data.evaluation.samples = {req.samples}: split '{split}' has {len(full)} images and "
                    f"{'other roles also draw from it' if others else 'no more'}; lower samples or use another split"
                )
            out[req.role] = _take(full, np.sort(perm[len(full) - n_eval :]))
        pool = perm[: len(full) - n_eval]
        for req in others:
            n = len(pool) if req.samples is None else req.samples
            if n > len(pool):
                raise ConfigError(
                    f"data.{req.role}.samples = {req.samples}: split '{split}' has {len(pool)} images left "
                    f"after reserving {n_eval} for evaluation; lower samples"
                )
            out[req.role] = _take(full, pool[:n])
    return out


def _take(full: LabelledImages, indices: np.ndarray) -> LabelledImages:
    return LabelledImages(full.images[indices], full.labels[indices], full.split, indices, full.classes)
