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
CNNs and HF decoders alike and resume bit-for-bit, with no dependency beyond torch.

    from compress.distill import DistillOptions, distill
    report = distill(student, teacher, batches, DistillOptions(max_steps=500), checkpoint_dir=run / "ckpt")
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.distill.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from compress.distill.losses import feature_mse, next_token_ce, soft_kl
from compress.distill.options import DistillOptions
from compress.errors import ConfigError, StageError

Batch = Any  # classification: (inputs, labels); causal-lm: {"input_ids", "attention_mask"?} or input_ids


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
    losses: tuple[float, ...]  # one per step run in this call


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and isinstance(output[0], torch.Tensor):
        return output[0]
    raise StageError(f"distill: cannot find logits in a model output of type {type(output).__name__}")


class _Task:
    """How one family's batches are fed and scored."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def split(self, batch: Batch) -> tuple[Any, Any]:
        """(model inputs, targets) of a batch."""
        if self.kind == "classification":
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise StageError("distill(classification): a batch must be (inputs, labels)")
            return batch[0], batch[1]
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise StageError("distill(causal-lm): a batch must be input_ids or a dict with 'input_ids'")
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        return inputs, inputs

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        if self.kind == "classification":
            return _logits(model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs))
        return _logits(model(**inputs, use_cache=False))

    def mask(self, targets: Any) -> torch.Tensor | None:
        return targets.get("attention_mask") if self.kind == "causal-lm" else None

    def task_loss(self, logits: torch.Tensor, targets: Any) -> torch.Tensor:
        if self.kind == "classification":
            return nn.functional.cross_entropy(logits.float(), targets)
        return next_token_ce(logits, targets["input_ids"], targets.get("attention_mask"))


class _FeatureTaps:
    """Forward hooks that keep the latest output of named modules (first tensor of a tuple output)."""

    def __init__(self, model: nn.Module, names: Sequence[str], which: str) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConfigError(
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
    kept = options.model_dump(mode="json", exclude={"max_seconds", "checkpoint_every", "teacher_cache_mb"})
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
    global RNG is seeded with `options.seed` at the start (dropout masks then follow from the step).
    """
    if len(data) == 0:
        raise StageError("distill: the training data is empty")
    task = _Task(options.task)
    total = total_steps(options, len(data))
    device = next(student.parameters()).device
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    torch.manual_seed(options.seed)

    teacher_training = teacher.training
    teacher_grads = [p.requires_grad for p in teacher.parameters()]
    teacher.eval().requires_grad_(False)
    student.train()
    s_taps = _FeatureTaps(student, [f.student for f in options.features], "the student")
    t_taps = _FeatureTaps(teacher, [f.teacher for f in options.features], "the teacher")
    try:
        return _run(student, teacher, data, options, task, total, device, folder, progress, s_taps, t_taps)
    finally:
        s_taps.remove()
        t_taps.remove()
        teacher.train(teacher_training)
        for p, flag in zip(teacher.parameters(), teacher_grads, strict=True):
            p.requires_grad_(flag)


def _run(
    student: nn.Module,
    teacher: nn.Module,
    data: Sequence[Batch],
    options: DistillOptions,
    task: _Task,
    total: int,
    device: torch.device,
    folder: Path | None,
    progress: Callable[[DistillProgress], None] | None,
    s_taps: _FeatureTaps,
    t_taps: _FeatureTaps,
) -> DistillReport:
    n = len(data)
    perms: dict[int, list[int]] = {}

    def batch_index(step: int) -> int:
        epoch, pos = divmod(step, n)
        if not options.shuffle:
            return pos
        if epoch not in perms:
            gen = torch.Generator().manual_seed(options.seed + epoch)
            perms[epoch] = torch.randperm(n, generator=gen).tolist()
        return perms[epoch][pos]

    cache: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    use_cache: bool | None = None if options.teacher_cache_mb > 0 else False

    def teacher_outputs(index: int, inputs: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        nonlocal use_cache
        if index in cache:
            logits, feats = cache[index]
            return logits.to(device), [f.to(device) for f in feats]
        with torch.no_grad():
            logits = task.forward(teacher, inputs)
            feats = t_taps.take()
        if use_cache is None:  # decide once, from the first batch's size
            per_batch = logits.numel() * logits.element_size() + sum(f.numel() * f.element_size() for f in feats)
            use_cache = per_batch * n <= options.teacher_cache_mb * 2**20
        if use_cache:
            cache[index] = (logits.detach().cpu(), [f.detach().cpu() for f in feats])
        return logits, feats

    # Projection heads need the feature widths: probe once on batch 0 in eval mode (no dropout draws).
    projections = nn.ModuleList()
    if options.features:
        probe_inputs, _ = task.split(_to_device(data[batch_index(0)], device))
        student.eval()
        with torch.no_grad():
            task.forward(student, probe_inputs)
            task.forward(teacher, probe_inputs)
        student.train()
        for s_feat, t_feat in zip(s_taps.take(), t_taps.take(), strict=True):
            cs, ct = _channels(s_feat), _channels(t_feat)
            projections.append(nn.Identity() if cs == ct else nn.Linear(cs, ct, bias=False))
        projections.to(device)

    params = [p for p in student.parameters() if p.requires_grad] + list(projections.parameters())
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(options, total))
    fingerprint = _fingerprint(options, total, n)

    step = 0
    if folder is not None and (state := load_checkpoint(folder)) is not None:
        if state["fingerprint"] != fingerprint:
            raise StageError(
                f"distill: the checkpoint in {folder} was made with other options or data "
                f"({state['fingerprint']}); now {fingerprint}. Delete it to start afresh"
            )
        student.load_state_dict(state["student"])
        projections.load_state_dict(state["projections"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step = int(state["step"])
    resumed_from = step

    def checkpoint() -> None:
        if folder is None:
            return
        save_checkpoint(
            folder,
            {
                "student": student.state_dict(),
                "projections": projections.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "rng": rng_state(),
                "fingerprint": fingerprint,
            },
        )

    start = time.monotonic()
    losses: list[float] = []
    stopped_by = "steps"
    while step < total:
        if options.max_seconds is not None and time.monotonic() - start >= options.max_seconds:
            stopped_by = "time"
            break
        index = batch_index(step)
        inputs, targets = task.split(_to_device(data[index], device))
        t_logits, t_feats = teacher_outputs(index, inputs)
        s_logits = task.forward(student, inputs)
        s_feats = s_taps.take()

        mask = task.mask(targets)
        kl = soft_kl(s_logits, t_logits, options.temperature, mask)
        hard = task.task_loss(s_logits, targets)
        feat = sum(
            (feature_mse(s, t, proj) for s, t, proj in zip(s_feats, t_feats, projections, strict=True)),
            start=torch.zeros((), device=device),
        )
        loss = (
            options.alpha * options.temperature**2 * kl + (1.0 - options.alpha) * hard + options.feature_weight * feat
        )
        if not torch.isfinite(loss):
            raise StageError(f"distill: the loss became {loss.item()} at step {step}; lower lr ({options.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if options.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        step += 1
        losses.append(loss.item())
        if options.checkpoint_every and step % options.checkpoint_every == 0:
            checkpoint()
        if progress is not None:
            progress(DistillProgress(step, total, loss.item(), kl.item(), hard.item(), float(feat.detach()), lr))
    checkpoint()
    return DistillReport(
        steps=step,
        total_steps=total,
        resumed_from=resumed_from,
        stopped_by=stopped_by,
        final_loss=losses[-1] if losses else float("nan"),
        seconds=time.monotonic() - start,
        teacher_cached=bool(use_cache),
        losses=tuple(losses),
    )


@torch.no_grad()
def mean_kl(
    student: nn.Module, teacher: nn.Module, data: Sequence[Batch], task: str, temperature: float = 1.0
) -> float:
    """Mean KL(teacher || student) per row (image or non-padding token) over `data`, both in eval mode."""
    kind = _Task(task)
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
