"""Options of structured pruning, shared by the vision (torch-pruning) and decoder (own code) paths.

YAML, as a `prune` stage would receive it::

    prune:
      importance: l2          # l1 | l2 | bn_scale | taylor (vision) ; l1 | l2 | wanda (causal-lm)
      target: {macs: 0.4}     # remove 40% of MACs, iteratively; or {channels: 0.5}: remove 50% of channels
      scope: global           # rank channels across layers (global) or prune every layer alike (uniform)
      ignored_layers: ["features.0.*"]
      round_to: 8
      # causal-lm only
      mlp_ratio: 0.25         # fraction of MLP intermediate channels removed in every layer
      heads_ratio: 0.33       # fraction of attention heads removed in every layer (vision: ViTs too)
      head_unit: query        # query: remove query heads evenly inside each KV group; kv_group: whole groups
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.errors import ConfigError
from compress.schema import Count, Real

VISION_IMPORTANCES = ("l1", "l2", "bn_scale", "taylor")  # the criteria prune_vision accepts
LLM_IMPORTANCES = ("l1", "l2", "wanda")  # the criteria prune_decoder accepts

Importance = Literal["l1", "l2", "bn_scale", "taylor", "wanda"]


@dataclass(frozen=True)
class PruneSupport:
    """What one family's pruner reads of `PruneOptions`; a `prune` stage is checked against it before work."""

    importances: tuple[str, ...]
    keys: frozenset[str]  # PruneOptions fields it reads; any other one set in a pipeline is refused
    needs_one_of: tuple[str, ...] = ()  # at least one of these must be above 0


VISION_PRUNING = PruneSupport(
    VISION_IMPORTANCES,
    frozenset(
        {"importance", "target", "steps", "scope", "max_layer_ratio", "ignored_layers", "round_to", "heads_ratio"}
    ),
)
DECODER_PRUNING = PruneSupport(
    LLM_IMPORTANCES,
    frozenset({"importance", "mlp_ratio", "heads_ratio", "head_unit", "round_to"}),
    needs_one_of=("mlp_ratio", "heads_ratio"),
)


class PruneTarget(BaseModel):
    """How much to remove: exactly one of `channels` or `macs`.

    `channels` is torch-pruning's `pruning_ratio` applied in one step (a fraction of the output channels
    of every prunable group, or of all of them when `scope` is global). `macs` is a reduction of
    multiply-accumulates of every Conv/Linear instance (`compress.prune.vision.count_macs`, cross-checked
    against torch-pruning's counter): the pruner removes channels in `steps` equal increments
    (torch-pruning's iterative pruning, its `linear_scheduler`) and stops at the first step whose measured
    MACs reduction reaches the target.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: Real | None = Field(
        None, gt=0.0, lt=1.0, description="Fraction of channels removed (0 < x < 1), in one step."
    )
    macs: Real | None = Field(
        None, gt=0.0, lt=1.0, description="Fraction of MACs removed (0 < x < 1), reached iteratively."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> PruneTarget:
        if (self.channels is None) == (self.macs is None):
            raise ConfigError(
                f"prune.target: give exactly one of 'channels' or 'macs'; got channels={self.channels}, "
                f"macs={self.macs}"
            )
        return self


class PruneOptions(BaseModel):
    """Structured pruning options (see the module docstring for a YAML example)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    importance: Importance = Field(
        "l2",
        description=(
            "Channel importance. l1/l2: norm of the coupled weights (torch-pruning MagnitudeImportance "
            "p=1/2); "
            "bn_scale: |gamma| of the BatchNorm after the channel (Liu et al. 2017, Network Slimming); "
            "taylor: |w * dL/dw| from calibration batches (Molchanov et al. 2019); wanda: causal-lm only, "
            "|W| times input activation norm from calibration text (Sun et al. 2023, arXiv 2306.11695)."
        ),
    )
    target: PruneTarget = Field(
        default_factory=lambda: PruneTarget(channels=0.5),
        description="How much to remove (vision): {channels: x} or {macs: x}.",
    )
    steps: Count = Field(
        20, ge=1, le=200, description="Increments used to reach a `macs` target (ignored for `channels`)."
    )
    scope: Literal["global", "uniform"] = Field(
        "uniform",
        description="global: rank channels of all layers together; uniform: same fraction in every layer.",
    )
    max_layer_ratio: Real = Field(
        0.9, gt=0.0, le=1.0, description="No layer loses more than this fraction of its channels."
    )
    ignored_layers: tuple[str, ...] = Field(
        (),
        description=(
            "Module-name globs (fnmatch) whose output channels are kept. The model's output layer is always kept."
        ),
    )
    round_to: Count = Field(8, ge=1, description="Kept channel counts are multiples of this (tensor-core friendly).")
    mlp_ratio: Real = Field(
        0.0, ge=0.0, lt=1.0, description="causal-lm: fraction of MLP intermediate channels removed per layer."
    )
    heads_ratio: Real = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="fraction of attention heads removed per layer (causal-lm; vision: ViTs, rounded up, one step).",
    )
    head_unit: Literal["query", "kv_group"] = Field(
        "query",
        description=(
            "causal-lm: 'query' removes query heads evenly inside every KV group (KV heads kept); "
            "'kv_group' removes whole KV groups (a KV head with all its query heads)."
        ),
    )
