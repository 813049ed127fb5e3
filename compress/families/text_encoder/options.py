"""The `model:` and `data:` options of a text-encoder pipeline and its source strings (light: `validate`
imports this, never torch or transformers)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.errors import ConfigError
from compress.schema import Count, Seed

SCHEMES = ("hf", "python")


class TextEncoderModelOptions(BaseModel):
    """`model:` of a text-encoder pipeline.

    ```yaml
    model:
      family: text-encoder
      source: hf:sentence-transformers/all-MiniLM-L6-v2   # or a local folder: hf:/models/my-encoder
      normalize: true
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    family: Literal["text-encoder"] = "text-encoder"
    source: str = Field(description="hf:FOLDER_OR_HUB_ID | python:module:function returning (model, tokenizer)")
    normalize: bool = Field(False, description="L2-normalise the pooled embeddings inside the model (and graph)")
    trust_remote_code: bool = Field(False, description="let transformers run code shipped with the model")


class PairsSource(BaseModel):
    """Where the labelled (query, positive) pairs come from."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["pydoc", "jsonl"] = Field(
        "pydoc", description='pydoc: built from CPython\'s help topics; jsonl: {"query": ..., "positive": ...} a line'
    )
    path: Path | None = Field(None, description="jsonl: the file (relative to the pipeline's folder, then the cwd)")

    @model_validator(mode="after")
    def _path_matches_kind(self) -> PairsSource:
        if self.kind == "jsonl" and self.path is None:
            raise ValueError("kind jsonl needs path: a file of one {query, positive} object per line")
        if self.kind == "pydoc" and self.path is not None:
            raise ValueError("kind pydoc takes no path (the topics ship with Python)")
        return self


class TextEncoderDataOptions(BaseModel):
    """`data:` of a text-encoder pipeline: calibration queries and evaluation queries never overlap.

    ```yaml
    data:
      pairs: {kind: pydoc}          # or {kind: jsonl, path: pairs.jsonl}
      calibration_queries: 32
      evaluation_queries: 64        # default: all that are available
      max_length: 256
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    pairs: PairsSource = Field(PairsSource(), description="the labelled retrieval set")
    calibration_queries: Count = Field(32, gt=0, description="queries whose texts calibrate (never evaluated)")
    evaluation_queries: Count | None = Field(None, gt=0, description="queries scored; default: all available")
    max_length: Count = Field(256, ge=8, le=8192, description="tokens per text; longer texts are truncated")
    batch_size: Count = Field(16, gt=0, description="texts per forward during evaluation")
    seed: Seed = Field(0, description="pydoc: which sentences of each topic become queries")


def parse_source(source: str) -> tuple[str, str]:
    scheme, sep, rest = source.partition(":")
    if not sep or scheme not in SCHEMES or not rest:
        raise ConfigError(
            f"model.source = {source!r}: expected hf:FOLDER_OR_ID or python:module:function (schemes: "
            f"{', '.join(SCHEMES)})"
        )
    return scheme, rest


def local_folder(rest: str, base_dir: Path) -> Path | None:
    """The folder an `hf:` value names (relative to the pipeline's folder, then the cwd), or None (a hub id)."""
    from compress.sources import resolve_path

    path = resolve_path(rest, base_dir)
    return path if path.is_dir() else None
