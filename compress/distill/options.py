"""Options of knowledge distillation (Hinton et al. 2015, arXiv 1503.02531).

YAML, as a `distill` stage would receive it::

    distill:
      task: classification        # classification | causal-lm
      temperature: 4.0
      alpha: 0.7                  # weight of the soft (KL) term; 1 - alpha weighs the task loss
      features:                   # optional hidden-feature matching (MSE, FitNets: arXiv 1412.6550)
        - {student: features.6, teacher: features.13}
      feature_weight: 1.0
      lr: 1.0e-4
      warmup_steps: 50
      max_steps: 2000             # and/or epochs; max_seconds caps wall-clock time on top
      checkpoint_every: 200
      gradient_accumulation_steps: 1  # micro-batches per optimizer step (memory; the batch stays the same)
      gradient_checkpointing: false   # recompute activations in backward (Hugging Face models)
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.errors import ConfigError
from compress.schema import Count, Real, Seed


class FeaturePair(BaseModel):
    """A student module whose output is pulled towards a teacher module's output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    student: str = Field(description="Module name in the student (as in named_modules()).")
    teacher: str = Field(description="Module name in the teacher (as in named_modules()).")


class DistillOptions(BaseModel):
    """Distillation loop options (see the module docstring for a YAML example)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Literal["classification", "causal-lm"] = Field(
        "classification",
        description="classification: batches are (inputs, labels); causal-lm: batches hold input_ids.",
    )
    temperature: Real = Field(2.0, gt=0.0, description="Softmax temperature T of the soft targets.")
    alpha: Real = Field(
        0.5, ge=0.0, le=1.0, description="loss = alpha * T^2 * KL + (1 - alpha) * task loss (+ features)."
    )
    features: tuple[FeaturePair, ...] = Field((), description="Module outputs matched with MSE.")
    feature_weight: Real = Field(1.0, ge=0.0, description="Weight of the summed feature MSE terms.")
    lr: Real = Field(1e-4, gt=0.0, description="Peak AdamW learning rate.")
    weight_decay: Real = Field(0.01, ge=0.0, description="AdamW decoupled weight decay.")
    warmup_steps: Count = Field(0, ge=0, description="Linear warm-up steps before the cosine decay.")
    min_lr_ratio: Real = Field(0.0, ge=0.0, le=1.0, description="Cosine decays to lr * min_lr_ratio.")
    max_grad_norm: Real | None = Field(1.0, gt=0.0, description="Global gradient-norm clip; null: none.")
    max_steps: Count | None = Field(None, ge=1, description="Optimizer steps; the schedule's horizon.")
    epochs: Real | None = Field(None, gt=0.0, description="Passes over the data (if max_steps is not set).")
    max_seconds: Real | None = Field(None, gt=0.0, description="Stop after this wall-clock time.")
    shuffle: bool = Field(True, description="Permute batches each epoch (seeded by seed + epoch).")
    seed: Seed = Field(0, description="Seed of the data order and of torch's RNG at the start.")
    checkpoint_every: Count = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    teacher_cache_mb: Real = Field(
        256.0,
        ge=0.0,
        description=(
            "Keep teacher outputs per batch index in CPU memory across epochs when all of them fit in this "
            "many MB (0: never). Valid only when data[i] returns the same batch every time."
        ),
    )

    gradient_accumulation_steps: Count = Field(
        1,
        ge=1,
        description=(
            "Split each process's share of a batch into this many micro-batches whose gradients add up before "
            "the optimizer step: less activation memory, the same result up to float round-off (BatchNorm "
            "excepted). The optimizer's batch stays batch_size; raise that for a larger batch."
        ),
    )
    gradient_checkpointing: bool = Field(
        False,
        description=(
            "Recompute the student's activations during backward (Hugging Face models' "
            "gradient_checkpointing_enable): less memory for decoders, more time, the same result."
        ),
    )

    @model_validator(mode="after")
    def _has_horizon(self) -> DistillOptions:
        if self.max_steps is None and self.epochs is None:
            raise ConfigError(
                "distill: give max_steps or epochs (the cosine schedule needs a horizon); "
                f"got max_steps=None, epochs=None, max_seconds={self.max_seconds}"
            )
        return self
