"""`distill`: train the input model (the student) towards a teacher's soft targets on `data.train`.

```yaml
- distill: {max_steps: 300, lr: 1.0e-3, temperature: 2.0, alpha: 0.7, batch_size: 64}
- distill: {teacher: finetune, epochs: 1, checkpoint_every: 50}
- distill: {max_steps: 200, lr: 1.0e-4, alpha: 1.0, batch_size: 4}    # causal-lm: token-level KL
```
The task is the one the model family declares (`Adapter.distill_task`, a task of `compress.distill.tasks`):
classification distils class logits (plus the label loss), causal-lm distils every next-token distribution
over the training windows (`data.train_windows`, which never overlap the evaluation windows; the task loss
is next-token cross-entropy on the same text).
The teacher defaults to the model before the nearest `prune` among the student's ancestors (prune ->
distill recovers what pruning lost, Hinton et al. 2015, arXiv 1503.02531), else the pipeline's baseline.
The loop is `compress.distill.distill`; its checkpoints live in `<runs>/.cache/distill/<key>/`, outside
the temporary artifact folder, so a killed run resumes from the last checkpoint on the next `compress run`
(same cache key, same teacher) and the folder is removed once the artifact is saved.

KL(teacher || student) at T = 1 on the calibration set (images, or every token of the calibration
windows) is reported before and after.

Launched on N processes (`accelerate launch --multi_gpu --num_processes N -m compress.cli run ...`), every
process runs this stage on its share of each batch (DDP; `batch_size` stays the whole batch, so the result
is the 1-process one up to round-off) and only rank 0 reports, checkpoints and saves (README "Multi-GPU
distillation").
"""

from __future__ import annotations

import shutil
import time
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from compress.distill.options import DistillOptions
from compress.errors import StageError
from compress.registry import register_stage
from compress.schema import Count
from compress.stages.base import Ancestor, StageContext, StageOptions, StageOutput

if TYPE_CHECKING:
    from compress.artifact import Artifact
    from compress.families.base import Adapter


class DistillStageOptions(StageOptions, DistillOptions):
    """Distil a teacher into the input model (the fields of `compress.distill.DistillOptions`, plus below).

    ```yaml
    - distill: {teacher: finetune, max_steps: 300, lr: 1.0e-3, alpha: 0.7, batch_size: 64}
    ```
    """

    needs_train_data: ClassVar[bool] = True
    every_process: ClassVar[bool] = True
    teacher: str | None = Field(
        None,
        description="artifact that teaches; default: the input of the nearest earlier prune in the student's "
        "lineage, else the baseline",
    )
    task: Literal["classification", "causal-lm"] | None = Field(
        None, description="default: the one the model family declares (the only one it takes)"
    )
    batch_size: Count = Field(64, gt=0, description="training batch size (images, or windows for causal-lm)")
    # A stage default unlike the library's 0 (end only): a killed stage should lose at most this many steps.
    checkpoint_every: Count = Field(100, ge=0, description="checkpoint every N steps (0: only at the end)")

    def check_plan(self, earlier: dict[str, str]) -> list[tuple[str, str]]:
        if self.teacher is None:
            return []
        if self.teacher not in earlier:
            return [("teacher", f"no earlier artifact of that name; earlier: {', '.join(earlier)}")]
        if earlier[self.teacher] != "torch":
            return [("teacher", f"the teacher must be a torch artifact; '{self.teacher}' is {earlier[self.teacher]}")]
        return []

    def check_lineage(
        self, lineage: tuple[Ancestor, ...], baseline: str, earlier: dict[str, str]
    ) -> list[tuple[str, str]]:
        """The default teacher (see `find_teacher`) must exist before this stage and be a torch model."""
        if self.teacher is not None:
            return []
        after_prune = [lineage[i + 1] for i, a in enumerate(lineage[:-1]) if a.kind == "prune"]
        if after_prune:
            teacher, why = after_prune[0].name, "the input of the nearest prune"
        elif baseline in earlier:
            teacher, why = baseline, "the baseline"
        else:
            return [
                ("teacher", f"no teacher: no prune before it and the baseline '{baseline}' comes later; set teacher")
            ]
        if earlier[teacher] != "torch":
            return [("teacher", f"the default teacher ({why}, '{teacher}') is {earlier[teacher]}; set a torch teacher")]
        return []

    def extra_inputs(self) -> tuple[str, ...]:
        return (self.teacher,) if self.teacher else ()

    @model_validator(mode="after")
    def _has_horizon(self) -> DistillStageOptions:
        # Overrides DistillOptions' check, which raises ConfigError: pydantic would let it escape without the
        # file:line of the stage; a ValueError becomes a located message.
        if self.max_steps is None and self.epochs is None:
            raise ValueError("give max_steps or epochs (the cosine schedule needs a horizon)")
        return self

    def check_family(self, adapter: type[Adapter]) -> list[tuple[str, str]]:
        declared = adapter.distill_task
        if declared is None:
            return [("task", f"the {adapter.family} family declares no distillation task")]
        if self.task is not None and self.task != declared:
            return [("task", f"does not fit family '{adapter.family}'; leave it out or set '{declared}'")]
        return []

    def library_options(self, task: str) -> DistillOptions:
        """The options of `compress.distill` for the family's declared `task`, without the stage's own keys."""
        fields = self.model_dump(include=set(DistillOptions.model_fields))
        return DistillOptions.model_validate({**fields, "task": task})

    def cache_fields(self) -> dict:
        # How often to checkpoint, whether teacher outputs are kept in memory and whether activations are
        # recomputed do not change the result. Micro-batches change round-off (and BatchNorm statistics): a
        # key with them, but the keys of pipelines without them stay what they were.
        unchanged = ("checkpoint_every", "teacher_cache_mb", "gradient_checkpointing")
        fields = {k: v for k, v in super().cache_fields().items() if k not in unchanged}
        if fields["gradient_accumulation_steps"] == 1:
            del fields["gradient_accumulation_steps"]
        return fields


def find_teacher(artifact: Artifact, options: DistillStageOptions, ctx: StageContext) -> Artifact:
    """The teacher artifact: `options.teacher`, else the input of the nearest prune in the lineage, else baseline.

    The plan already checked this (`check_plan`, `check_lineage`); a StageError here means the artifacts
    the run holds differ from the plan's."""
    arts = ctx.artifacts
    earlier = ", ".join(arts)
    if options.teacher is not None:
        if options.teacher not in arts:
            raise StageError(
                f"distill.teacher = {options.teacher!r}: no earlier artifact of that name; earlier: {earlier}"
            )
        teacher = arts[options.teacher]
    else:
        teacher, node = None, artifact
        while node is not None:
            if node.stage == "prune" and node.parent in arts:
                teacher = arts[node.parent]
                break
            node = arts.get(node.parent) if node.parent else None
        if teacher is None:
            if ctx.baseline is None:
                raise StageError(
                    f"distill: no teacher given, no prune before it and no baseline yet; set teacher (one of {earlier})"
                )
            teacher = arts[ctx.baseline]
    if teacher.format != "torch":
        raise StageError(
            f"distill.teacher = {teacher.name!r} is a {teacher.format} artifact; a torch artifact is needed"
        )
    if teacher.name == artifact.name:
        raise StageError(f"distill: the teacher {teacher.name!r} is the student itself; set teacher")
    if not teacher.task_ready:
        raise StageError(
            f"distill.teacher = {teacher.name!r} has an untrained head (task_ready false); add a finetune stage "
            "before it or name a trained teacher"
        )
    return teacher


@register_stage("distill", options=DistillStageOptions)
def distill(artifact, options: DistillStageOptions, ctx: StageContext) -> StageOutput:
    """Knowledge distillation from a teacher artifact into the input model, resumable from checkpoints."""
    import torch

    from compress.distill import distill as run_distill
    from compress.distill import mean_kl, total_steps
    from compress.distill.tasks import distill_task
    from compress.distributed import device, processes
    from compress.hashing import sha256_json

    adapter = ctx.adapter
    main = processes().is_main  # the other processes of an N-process launch only train
    loop = options.library_options(adapter.distill_task)
    teacher_art = find_teacher(artifact, options, ctx)
    torch.set_num_threads(ctx.threads)
    student = adapter.load_torch(artifact).to(device())
    teacher = adapter.load_torch(teacher_art).to(device())
    train = adapter.train_batches(options.batch_size, seed=options.seed)
    kl_data_batches = adapter.kl_batches()
    kl_before = mean_kl(student, teacher, kl_data_batches, loop.task) if main else float("nan")

    total = total_steps(loop, len(train))
    # The teacher's key is part of the folder name: an explicit teacher outside the lineage is not in ctx.key.
    folder = adapter.cache_dir / "distill" / sha256_json({"stage": ctx.key, "teacher": teacher_art.key})[:20]
    start = time.perf_counter()
    with ctx.reporter.task(f"distill {teacher_art.name} -> {artifact.name}", total=total) as task:
        done = 0

        def progress(p) -> None:  # noqa: ANN001 - compress.distill.DistillProgress
            nonlocal done
            task.advance(p.step - done, info=f"loss {p.loss:.4f} kl {p.kl:.4f} lr {p.lr:.2e}")
            done = p.step

        report = run_distill(student, teacher, train, loop, checkpoint_dir=folder, progress=progress)
    seconds = time.perf_counter() - start
    if not main:  # rank 0 holds the same student and writes it
        return StageOutput(file="", format="torch", precision=artifact.precision)
    kl_after = mean_kl(student, teacher, kl_data_batches, loop.task)
    student.eval()
    file = adapter.save_torch(student.cpu(), ctx.outdir)
    shutil.rmtree(folder, ignore_errors=True)  # the artifact now holds the result

    if report.resumed_from:
        ctx.reporter.log(f"  resumed from the checkpoint at step {report.resumed_from}/{report.total_steps}")
    ctx.reporter.log(
        f"  KL(teacher || student) on calibration: {kl_before:.4g} -> {kl_after:.4g} "
        f"in {report.steps} steps ({report.stopped_by})"
    )
    info = {
        "teacher": teacher_art.name,
        "kl_before": round(kl_before, 5),
        "kl_after": round(kl_after, 5),
        "kl_data": {"set": "calibration", **distill_task(loop.task).rows(kl_data_batches), "temperature": 1},
        "steps": report.steps,
        "total_steps": report.total_steps,
        "resumed_from_step": report.resumed_from,
        "stopped_by": report.stopped_by,
        "final_loss": round(report.final_loss, 5),
        "train_batches": len(train),
        "distill_seconds": round(seconds, 1),
        "processes": report.processes,
        "sharded": report.sharded,
    }
    return StageOutput(file=file, format="torch", precision=artifact.precision, info=info)
