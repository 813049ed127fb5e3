"""Ranks 1..N-1 of an N-process `compress run`: they train when rank 0 says so and write nothing.

Rank 0 (the leader) runs the whole pipeline as one process would: lock, cache, resume, evaluation,
benchmarks, manifest, report. When it reaches a stage that runs on every process (`StageOptions.every_process`:
finetune, distill) and the cache does not have it, it sends the stage and its context to the others
(`lead`); they run the same stage function on the artifacts rank 0 committed (the runs folder must be
shared by all processes), train their share of each batch, and discard their copy of the result. At the
end the leader sends its exit code, and every process exits with it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from compress.distributed import leave, processes
from compress.progress import Reporter
from compress.stages.base import StageContext

if TYPE_CHECKING:
    from compress.artifact import Artifact
    from compress.config import PipelineConfig


@dataclass(frozen=True)
class StageOrder:
    """What the leader sends for one stage: which of the pipeline's stages, and its context."""

    index: int  # into PipelineConfig.stages
    artifacts: dict[str, Artifact]
    baseline: str | None
    threads: int
    seed: int
    key: str


@dataclass(frozen=True)
class Done:
    exit_code: int


_training = {"now": False}  # rank 0 sent a stage whose end it has not seen (see `finish`)


def lead(order: StageOrder) -> None:
    """Rank 0: have the followers run a stage with this process (no-op in a 1-process run)."""
    procs = processes()
    if procs.distributed:
        procs.broadcast(order)
        _training["now"] = True


def led_stage_done() -> None:
    """Rank 0: the stage sent by `lead` returned here (and so, in step with us, on the followers)."""
    _training["now"] = False


def finish(exit_code: int) -> None:
    """Every rank at the end of an N-process run (no-op in a 1-process run): rank 0 releases the followers
    with the run's exit code, then all leave the process group together (`distributed.leave`).

    Not when rank 0 failed inside a stage the followers run: they are waiting in that stage's collectives,
    not for this message, so rank 0 just exits and the launcher stops them (it stops every process when
    one fails)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _training["now"]:
        return  # not launched N-wide (and `processes()` may be what failed), or see above
    procs = processes()
    if not procs.distributed:
        return
    if procs.is_main:
        procs.broadcast(Done(exit_code))
    procs.barrier()  # the followers have the message: nobody is still in a collective
    leave()


def follow(cfg: PipelineConfig, runs_dir: Path) -> int:
    """Ranks > 0: run the stages the leader sends until it sends its exit code; return that code."""
    from compress.runner import make_adapter

    procs = processes()
    silent = Reporter(quiet=True, console=Console(file=open(os.devnull, "w")))  # noqa: SIM115 - for the run
    adapter = None
    while True:
        message = procs.broadcast(None)
        if isinstance(message, Done):
            return message.exit_code
        plan = cfg.stages[message.index]
        adapter = adapter or make_adapter(cfg, silent, runs_dir / ".cache")
        with tempfile.TemporaryDirectory(prefix="compress-follower-") as scratch:  # a stage that writes anyway
            ctx = StageContext(
                adapter=adapter,
                outdir=Path(scratch),
                artifacts=message.artifacts,
                baseline=message.baseline,
                reporter=silent,
                threads=message.threads,
                seed=message.seed,
                key=message.key,
            )
            plan.spec.run(message.artifacts[plan.input], plan.options, ctx)
