"""Knowledge distillation loop: a frozen teacher's soft targets train a (pruned or smaller) student.

    loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * task + feature_weight * sum(MSE)

(Hinton et al. 2015, arXiv 1503.02531; the T^2 keeps the soft term's gradient scale independent of T.)
The task loss is cross-entropy with labels (classification) or next-token cross-entropy on the training
text (causal-lm, where the KL is per token over non-padding positions). Optional feature terms match
named module outputs (FitNets, arXiv 1412.6550) through a learned Linear when widths differ.

AdamW, linear warm-up then cosine decay, global gradient-norm clipping. Batch `step` is `data[perm_e[i]]`
with `e = step // len(data)`, `i = step % len(data)` and `perm_e` a permutation seeded by `seed + e`:
the data order is a function of the step, so a resumed run sees exactly the batches it would have seen.
We write this loop ourselves (rather than use transformers' Trainer) because it must serve plain torch
CNNs and HF decoders alike and resume bit-for-bit. Hugging Face accelerate carries it across processes:
launched N-wide (`compress.distributed`), the student is wrapped in DDP by `Accelerator.prepare_model`
(or, under an FSDP launch, trained as a sharded twin: `compress.fsdp`),
every rank computes the teacher and the student on its rows of each batch (`compress.distill.shards`:
N processes x b rows == 1 process x N*b rows), only rank 0 writes checkpoints, and the checkpoint keeps
every rank's RNG state, so a killed N-process run resumes as it would have gone on.

    from compress.distill import DistillOptions, distill
    report = distill(student, teacher, batches, DistillOptions(max_steps=500), checkpoint_dir=run / "ckpt")
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress import distributed
from compress.distill.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from compress.distill.losses import feature_mse, project_feature, soft_kl
from compress.distill.options import DistillOptions
from compress.distill.shards import cut, micro_batches, rows
from compress.distill.tasks import Batch, DistillTask, distill_task
from compress.distributed import Processes, processes
from compress.errors import StageError


@dataclass(frozen=True)
class DistillProgress:
    """Reported after every optimizer step (and after that step's checkpoint, if one was due)."""

    step: int
    total_steps: int
    loss: float
    kl: float
    task_loss: float
    feature_loss: float
    lr: float


@dataclass(frozen=True)
class DistillReport:
    steps: int
    total_steps: int
    resumed_from: int  # 0 when the run started fresh
    stopped_by: str  # "steps" | "time"
    final_loss: float
    seconds: float
    teacher_cached: bool
    losses: tuple[float, ...]  # one per step run in this call (the whole batch's loss, over all processes)
    processes: int = 1
    sharded: bool = False  # the student trained FSDP-sharded (compress.fsdp)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value


class _FeatureTaps:
    """Forward hooks that keep the latest output of named modules (first tensor of a tuple output)."""

    def __init__(self, model: nn.Module, names: Sequence[str], which: str) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise StageError(
                f"distill.features: {which} has no module {missing}; names look like {[n for n in modules if n][:8]}"
            )
        self.names = list(names)
        self.values: dict[str, torch.Tensor] = {}
        self._hooks = [modules[n].register_forward_hook(self._keeper(n)) for n in self.names]

    def _keeper(self, name: str) -> Callable[..., None]:
        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.values[name] = output[0] if isinstance(output, (tuple, list)) else output

        return keep

    def take(self) -> list[torch.Tensor]:
        out = [self.values[n] for n in self.names]
        self.values.clear()
        return out

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _channels(feature: torch.Tensor) -> int:
    return feature.shape[1] if feature.dim() == 4 else feature.shape[-1]


def _schedule(options: DistillOptions, total: int) -> Callable[[int], float]:
    warmup = options.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return options.min_lr_ratio + (1.0 - options.min_lr_ratio) * cosine

    return factor


def _fingerprint(options: DistillOptions, total: int, data_len: int) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: everything but the budget knobs."""
    # Accumulation and recomputation change round-off only: a checkpoint stays valid across them.
    budget = {"max_seconds", "checkpoint_every", "teacher_cache_mb"}
    kept = options.model_dump(mode="json", exclude=budget | {"gradient_accumulation_steps", "gradient_checkpointing"})
    return {"options": repr(sorted(kept.items())), "total_steps": total, "data_len": data_len}


def total_steps(options: DistillOptions, data_len: int) -> int:
    """Steps the schedule spans: max_steps, or ceil(epochs * len(data)), whichever is smaller."""
    candidates = [s for s in (options.max_steps,) if s is not None]
    if options.epochs is not None:
        candidates.append(math.ceil(options.epochs * data_len))
    return min(candidates)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Sequence[Batch],
    options: DistillOptions,
    *,
    checkpoint_dir: str | Path | None = None,
    progress: Callable[[DistillProgress], None] | None = None,
) -> DistillReport:
    """Train `student` in place against `teacher` and report the run.

    `data` is a map-style sequence of batches (see the module docstring for the order). With
    `checkpoint_dir`, a checkpoint is written every `checkpoint_every` steps and at the end, and a run that
    finds a checkpoint there resumes from its step (StageError if the options or data length differ).
    The teacher is put in eval mode with gradients off for the run and restored afterwards. torch's
    global RNG is seeded with `options.seed` at the start (dropout masks then follow from the step; rank r
    of N > 1 continues from `seed + r`). Launched N-wide, every rank calls this with the same models and
    data; the student ends equal on all of them.
    """
    if len(data) == 0:
        raise StageError("distill: the training data is empty")
    task = distill_task(options.task)
    device = next(student.parameters()).device
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    torch.manual_seed(options.seed)

    teacher_training = teacher.training
    teacher_grads = [p.requires_grad for p in teacher.parameters()]
    teacher.eval().requires_grad_(False)
    student.train()
    s_taps = _FeatureTaps(student, [f.student for f in options.features], "the student")
    t_taps = _FeatureTaps(teacher, [f.teacher for f in options.features], "the teacher")
    checkpointing = _gradient_checkpointing(student, options.gradient_checkpointing)
    try:
        loop = _Loop(student, teacher, data, options, task, device, s_taps, t_taps)
        return loop.run(folder, progress)
    finally:
        s_taps.remove()
        t_taps.remove()
        checkpointing.close()
        teacher.train(teacher_training)
        for p, flag in zip(teacher.parameters(), teacher_grads, strict=True):
            p.requires_grad_(flag)


def _gradient_checkpointing(student: nn.Module, wanted: bool) -> contextlib.ExitStack:
    """Turn on Hugging Face activation (gradient) checkpointing for the run; the returned stack turns it off.

    transformers 5 names it `activation_checkpointing_enable`, earlier versions `gradient_checkpointing_enable`."""
    stack = contextlib.ExitStack()
    if not wanted:
        return stack
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        enable, disable = getattr(student, f"{name}_enable", None), getattr(student, f"{name}_disable", None)
        if enable is not None and disable is not None:
            enable(**{f"{name}_kwargs": {"use_reentrant": False}})  # non-reentrant: works under DDP
            stack.callback(disable)
            return stack
    raise StageError(
        f"distill.gradient_checkpointing: the student ({type(student).__name__}) is not a Hugging Face model "
        "with activation/gradient checkpointing; set it to false"
    )


class _Trainable(nn.Module):
    """The student and the feature projections as one module, so that DDP averages the gradients of both
    (a forward outside the DDP wrapper would not be synchronised). Returns (logits, projected features)."""

    def __init__(self, student: nn.Module, projections: nn.ModuleList, task: DistillTask, taps: _FeatureTaps):
        super().__init__()
        self.student, self.projections = student, projections
        self._task, self._taps = task, taps

    def forward(self, inputs: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits = self._task.forward(self.student, inputs)
        feats = [project_feature(f, p) for f, p in zip(self._taps.take(), self.projections, strict=True)]
        return logits, feats


def _batch_order(options: DistillOptions, n: int) -> Callable[[int], int]:
    """step -> index into the data: `perm_e[step % n]`, `perm_e` seeded by `seed + step // n` (module docstring)."""
    perms: dict[int, list[int]] = {}

    def batch_index(step: int) -> int:
        epoch, pos = divmod(step, n)
        if not options.shuffle:
            return pos
        if epoch not in perms:
            gen = torch.Generator().manual_seed(options.seed + epoch)
            perms[epoch] = torch.randperm(n, generator=gen).tolist()
        return perms[epoch][pos]

    return batch_index


class _TeacherOutputs:
    """The teacher's logits and features per (batch index, micro-batch) of this rank, kept on the CPU when
    all `n` of them fit the budget."""

    def __init__(self, teacher: nn.Module, task: DistillTask, taps: _FeatureTaps, options: DistillOptions, n: int):
        self.teacher, self.task, self.taps, self.n = teacher, task, taps, n
        self.budget = options.teacher_cache_mb * 2**20
        self.cache: dict[tuple[int, int], tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self.use_cache: bool | None = None if options.teacher_cache_mb > 0 else False

    def __call__(
        self, index: tuple[int, int], inputs: Any, device: torch.device
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if index in self.cache:
            logits, feats = self.cache[index]
            return logits.to(device), [f.to(device) for f in feats]
        with torch.no_grad():
            logits = self.task.forward(self.teacher, inputs)
            feats = self.taps.take()
        if self.use_cache is None:  # decide once, from the first batch's size
            per_batch = logits.numel() * logits.element_size() + sum(f.numel() * f.element_size() for f in feats)
            self.use_cache = per_batch * self.n <= self.budget
        if self.use_cache:
            self.cache[index] = (logits.detach().cpu(), [f.detach().cpu() for f in feats])
        return logits, feats


class _Loop:
    """One distillation run: projections, optimizer and schedule, checkpoints, and the step loop."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        data: Sequence[Batch],
        options: DistillOptions,
        task: DistillTask,
        device: torch.device,
        s_taps: _FeatureTaps,
        t_taps: _FeatureTaps,
    ) -> None:
        self.student, self.teacher, self.data, self.options, self.task = student, teacher, data, options, task
        self.device, self.s_taps, self.t_taps = device, s_taps, t_taps
        self.procs: Processes = processes()
        self.total = total_steps(options, len(data))
        self.batch_index = _batch_order(options, len(data))
        micro = options.gradient_accumulation_steps
        self.teacher_outputs = _TeacherOutputs(teacher, task, t_taps, options, len(data) * micro)
        self.projections = self._projections()
        # DDP (N > 1) broadcasts rank 0's weights here, FSDP shards them into a twin; one process trains
        # the module itself.
        trainable = _Trainable(student, self.projections, task, s_taps)
        self.trainable = distributed.prepare(trainable, shared=(task, s_taps))
        self.model = self.trainable.model
        if self.procs.distributed:
            torch.manual_seed(options.seed + self.procs.rank)  # each rank its own dropout masks
        self.params = self.trainable.parameters()  # the student's, then the projections'
        self.optimizer = torch.optim.AdamW(self.params, lr=options.lr, weight_decay=options.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(options, self.total))
        self.fingerprint = _fingerprint(options, self.total, len(data))

    def _projections(self) -> nn.ModuleList:
        """Projection heads need the feature widths: probe once on batch 0 in eval mode (no dropout draws)."""
        projections = nn.ModuleList()
        if not self.options.features:
            return projections
        probe_inputs, _ = self.task.split(_to_device(self.data[self.batch_index(0)], self.device))
        self.student.eval()
        with torch.no_grad():
            self.task.forward(self.student, probe_inputs)
            self.task.forward(self.teacher, probe_inputs)
        self.student.train()
        for s_feat, t_feat in zip(self.s_taps.take(), self.t_taps.take(), strict=True):
            cs, ct = _channels(s_feat), _channels(t_feat)
            projections.append(nn.Identity() if cs == ct else nn.Linear(cs, ct, bias=False))
        return projections.to(self.device)

    def _resume(self, folder: Path | None) -> int:
        """The step of the checkpoint in `folder` (state restored), 0 when there is none."""
        if folder is None or (state := load_checkpoint(folder)) is None:
            return 0
        if state["fingerprint"] != self.fingerprint:
            raise StageError(
                f"distill: the checkpoint in {folder} was made with other options or data "
                f"({state['fingerprint']}); now {self.fingerprint}. Delete it to start afresh"
            )
        self.student.load_state_dict(state["student"])
        self.projections.load_state_dict(state["projections"])
        self.trainable.push()
        self.trainable.load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # Every rank reads the file rank 0 wrote (the runs folder is shared by all processes). A rank the
        # checkpoint has no RNG state for (more processes than when it was written) keeps its seed + rank.
        by_rank = [state["rng"], *state.get("rng_ranks", [])]
        if self.procs.rank < len(by_rank):
            set_rng_state(by_rank[self.procs.rank])
        return int(state["step"])

    def _checkpoint(self, folder: Path | None, step: int) -> None:
        """Rank 0 writes; every rank must call this at the same steps (it gathers the RNG states)."""
        if folder is None:
            return
        rngs = self.procs.gather(rng_state())
        self.trainable.pull()  # FSDP: the full weights and optimizer state, gathered on every rank
        optimizer = self.trainable.optimizer_state(self.optimizer)
        if not self.procs.is_main:
            return
        state = {
            "student": self.student.state_dict(),
            "projections": self.projections.state_dict(),
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "step": step,
            "rng": rngs[0],
            "fingerprint": self.fingerprint,
        }
        if len(rngs) > 1:
            state["rng_ranks"] = rngs[1:]
        save_checkpoint(folder, state)

    def _losses(
        self, step: int, key: tuple[int, int], micro: Batch, weights: tuple[float, float, float]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, kl, task loss, feature loss) of one micro-batch, each term weighted by its share of the batch."""
        options, task = self.options, self.task
        inputs, targets = task.split(_to_device(micro, self.device))
        t_logits, t_feats = self.teacher_outputs(key, inputs, self.device)
        s_logits, s_feats = self.model(inputs)
        kl = soft_kl(s_logits, t_logits, options.temperature, task.mask(targets)) * weights[0]
        hard = task.task_loss(s_logits, targets) * weights[1]
        feat = (
            sum(
                (feature_mse(s, t) for s, t in zip(s_feats, t_feats, strict=True)),
                start=torch.zeros((), device=self.device),
            )
            * weights[2]
        )
        loss = (
            options.alpha * options.temperature**2 * kl + (1.0 - options.alpha) * hard + options.feature_weight * feat
        )
        if not torch.isfinite(loss):
            raise StageError(f"distill: the loss became {loss.item()} at step {step}; lower lr ({options.lr})")
        return loss, kl, hard, feat

    def _step(self, step: int) -> list[float]:
        """One optimizer step on the batch of `step`: this rank's micro-batches, DDP's average, clip, update.

        Returns the whole batch's (loss, kl, task loss, feature loss), averaged over the ranks."""
        procs, index = self.procs, self.batch_index(step)
        batch = self.data[index]
        n = rows(batch)
        kl_rows, task_rows = self.task.counts(self.task.split(batch)[1])
        parts = micro_batches(n, procs.rank, procs.world, self.options.gradient_accumulation_steps)
        self.optimizer.zero_grad(set_to_none=True)
        sums = [0.0, 0.0, 0.0, 0.0]
        for j, (lo, hi) in enumerate(parts):
            micro = cut(batch, lo, hi)
            part_kl, part_task = self.task.counts(self.task.split(micro)[1])
            w = procs.world
            weights = (w * part_kl / max(kl_rows, 1.0), w * part_task / max(task_rows, 1.0), w * (hi - lo) / n)
            # gradients of all but the last micro-batch stay local; the last backward all-reduces them
            sync = contextlib.nullcontext() if j == len(parts) - 1 else self.trainable.no_sync()
            with sync:
                terms = self._losses(step, (index, j), micro, weights)
                terms[0].backward()
            sums = [total + float(term.detach()) for total, term in zip(sums, terms, strict=True)]
        if self.options.max_grad_norm is not None:
            # after DDP's all-reduce every rank holds the same gradients, so torch's clip is the global one;
            # under FSDP the gradients are DTensor shards and torch's clip reduces their norm over the ranks
            torch.nn.utils.clip_grad_norm_(self.params, self.options.max_grad_norm)
        self.optimizer.step()
        return procs.mean(sums)

    def run(self, folder: Path | None, progress: Callable[[DistillProgress], None] | None) -> DistillReport:
        options = self.options
        step = resumed_from = self._resume(folder)
        start = time.monotonic()
        losses: list[float] = []
        stopped_by = "steps"
        while step < self.total:
            # rank 0's clock decides, so that every rank stops at the same step
            out_of_time = options.max_seconds is not None and time.monotonic() - start >= options.max_seconds
            if self.procs.broadcast(out_of_time):
                stopped_by = "time"
                break
            values = self._step(step)
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            step += 1
            losses.append(values[0])
            if options.checkpoint_every and step % options.checkpoint_every == 0:
                self._checkpoint(folder, step)
            if progress is not None and self.procs.is_main:
                progress(DistillProgress(step, self.total, *values, lr))
        self._checkpoint(folder, step)
        self.trainable.pull()  # the student holds the trained weights on every rank
        return DistillReport(
            steps=step,
            total_steps=self.total,
            resumed_from=resumed_from,
            stopped_by=stopped_by,
            final_loss=losses[-1] if losses else float("nan"),
            seconds=time.monotonic() - start,
            teacher_cached=bool(self.teacher_outputs.use_cache),
            losses=tuple(losses),
            processes=self.procs.world,
            sharded=self.trainable.sharded,
        )


@torch.no_grad()
def mean_kl(
    student: nn.Module, teacher: nn.Module, data: Sequence[Batch], task: str, temperature: float = 1.0
) -> float:
    """Mean KL(teacher || student) per row (image or non-padding token) over `data`, both in eval mode.

    `task` names a task of `compress.distill.tasks.TASKS` (the model family's `distill_task`)."""
    kind = distill_task(task)
    device = next(student.parameters()).device
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    try:
        values = []
        for batch in data:
            inputs, targets = kind.split(_to_device(batch, device))
            values.append(
                soft_kl(
                    kind.forward(student, inputs),
                    kind.forward(teacher, inputs),
                    temperature,
                    kind.mask(targets),
                ).item()
            )
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return sum(values) / len(values)
