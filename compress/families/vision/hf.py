"""Hugging Face image classifiers (`source: hf:FOLDER_OR_ID`) as plain `input` -> `logits` modules.

transformers' models take `pixel_values=` and return an output object; the pipeline exports, prunes and
evaluates a module whose one argument is the image batch and whose one output is the logits, so the model
is wrapped. Remote code is never run (`trust_remote_code` stays off; a folder whose config names code is
refused before this is reached). The classifier head is the last `nn.Linear`, which
`compress.families.vision.model_io.replace_head` replaces for `num_classes`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class ImageClassifier(nn.Module):
    """`model(pixel_values=x).logits` as `forward(input)`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the exported graph's input name
        return self.model(pixel_values=input, return_dict=True).logits  # (B, num_labels)


def load_image_classifier(target: str, source: str) -> ImageClassifier:
    """`target`: a local folder (offline) or a hub id; `source` names the pipeline's value in errors."""
    from transformers import AutoModelForImageClassification

    from compress.sources import quiet_transformers

    quiet_transformers()
    local = Path(target).is_dir()
    kwargs: dict[str, Any] = {"trust_remote_code": False, "local_files_only": local}
    try:
        model = AutoModelForImageClassification.from_pretrained(target, **kwargs)
    except ValueError as exc:  # a config transformers maps to no image classifier (a BERT, a decoder)
        raise ValueError(f"model.source = {source}: not an image classifier ({exc})".replace("\n", " ")) from None
    except OSError as exc:
        where = "folder" if local else "hub id (is the hub reachable? a local folder works offline)"
        raise ValueError(f"model.source = {source}: could not load the {where}: {exc}") from None
    return ImageClassifier(model.eval())
