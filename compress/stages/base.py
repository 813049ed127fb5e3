"""What every stage shares: the options base class, the context a stage runs in, and its output.

A stage never names a model family: the family declares which stage kinds it takes (`Adapter.stage_kinds`)
and what a stage reads of it (prune support, INT4 methods, distillation task, quality metric).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from compress.paths import check_artifact_name

if TYPE_CHECKING:
    from compress.artifact import Artifact
    from compress.families.base import Adapter
    from compress.progress import Reporter


@dataclass(frozen=True)
class Ancestor:
    """An artifact in the line a stage starts from, as the plan knows it before any work."""

    name: str
    kind: str  # stage kind that makes it, or "source"
    format: str


class StageOptions(BaseModel):
    """Keys every stage accepts. Subclasses add their own typed, described options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(
        None, description="name of the artifact (its folder in the run) this stage makes; default: the stage kind"
    )
    input: str | None = Field(None, description="artifact this stage starts from; default: the previous stage's")
    optional: bool = Field(False, description="if the stage cannot run here (e.g. no GPU), skip it with a note")

    _names = field_validator("name", "input")(check_artifact_name)

    #: artifact formats the stage can start from
    accepts: ClassVar[frozenset[str]] = frozenset({"torch"})
    #: the stage needs the pipeline's training data
    needs_train_data: ClassVar[bool] = False
    #: launched N-wide, every process runs the stage (it trains with DDP); else rank 0 alone (`compress.follower`)
    every_process: ClassVar[bool] = False

    @property
    def streams_weights(self) -> bool:
        """True when the stage reads its input's weight files one piece at a time, never the model in memory:
        the only kind of stage a linked source (`model.link: true`) can feed."""
        return False

    def output_format(self, input_format: str) -> str:
        return input_format

    def check_plan(self, earlier: dict[str, str]) -> list[tuple[str, str]]:
        """Problems with the artifacts this stage names, given the earlier ones {name: format}: [(key, message)]."""
        return []

    def check_lineage(
        self, lineage: tuple[Ancestor, ...], baseline: str, earlier: dict[str, str]
    ) -> list[tuple[str, str]]:
        """Problems only the input's ancestry shows (nearest first, ending at the source): [(key, message)]."""
        return []

    def check_family(self, adapter: type[Adapter]) -> list[tuple[str, str]]:
        """Problems with options that do not fit what the pipeline's model family declares: [(key, message)].

        Whether the family takes this stage at all is its own declaration (`Adapter.stage_kinds`)."""
        return []

    def output_precision(self, input_precision: str) -> str:
        """Precision of the artifact this stage makes from one of `input_precision` (the validate-time chain)."""
        return input_precision

    def input_precision_problem(self, name: str, precision: str) -> str | None:
        """Why the stage cannot start from artifact `name` of `precision`; None when it can."""
        return None

    def extra_inputs(self) -> tuple[str, ...]:
        """Artifacts besides the input that the output depends on (their keys join the cache key)."""
        return ()

    def cache_fields(self) -> dict[str, Any]:
        """Options that change the output (naming and wiring keys do not)."""
        return self.model_dump(mode="json", exclude={"name", "input", "optional"})


@dataclass
class StageContext:
    adapter: Adapter
    outdir: Path  # write the new artifact's files here (a temporary folder the runner renames)
    artifacts: Mapping[str, Artifact]  # every artifact made so far, by name
    baseline: str | None  # name of the baseline artifact, if already made
    reporter: Reporter
    threads: int
    seed: int
    key: str  # cache key of the artifact being made: names state that must survive a killed run


@dataclass(frozen=True)
class StageOutput:
    file: str  # main file inside outdir
    format: str
    precision: str
    info: dict[str, Any] = field(default_factory=dict)
    target: str | None = None
    unmeasured: str | None = None  # why this machine cannot evaluate or benchmark the file (e.g. needs a GPU)
