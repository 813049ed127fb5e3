"""`finetune`: train a (new) classifier head, optionally the whole net, on the task. Its result is the
baseline and the teacher of later stages.

```yaml
- finetune: {epochs: 1, lr: 1.0e-3, train: all, batch_size: 64}
```
Launched on N processes, every process trains on its share of each batch under accelerate's DDP (the
rows and weights of `compress.distill.shards`: `batch_size` stays the whole batch) and rank 0 saves.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from compress.errors import StageError
from compress.registry import register_stage
from compress.schema import Count, Real
from compress.stages.base import StageContext, StageOptions, StageOutput


class FinetuneOptions(StageOptions):
    """Train on `data.train` with AdamW and a warm-up + cosine learning-rate schedule."""

    needs_train_data: ClassVar[bool] = True
    every_process: ClassVar[bool] = True
    epochs: Real | None = Field(1.0, gt=0, description="passes over data.train (fractions allowed)")
    steps: Count | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    batch_size: Count = Field(64, gt=0)
    lr: Real = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: Real = Field(0.01, ge=0)
    warmup: Real = Field(0.05, ge=0, lt=1, description="fraction of steps with linear warm-up")
    train: Literal["head", "all"] = Field("all", description="head: only the classifier; all: the whole net")
    label_smoothing: Real = Field(0.0, ge=0, lt=1)
    gradient_accumulation_steps: Count = Field(
        1,
        ge=1,
        description="split each process's share of a batch into this many micro-batches (less memory; the same "
        "result up to round-off, BatchNorm excepted); the optimizer's batch stays batch_size",
    )

    def cache_fields(self) -> dict:
        fields = super().cache_fields()
        if fields["gradient_accumulation_steps"] == 1:  # the keys of pipelines without it stay what they were
            del fields["gradient_accumulation_steps"]
        return fields

    @model_validator(mode="after")
    def _budget(self) -> FinetuneOptions:
        if self.epochs is None and self.steps is None:
            raise ValueError("set epochs or steps")
        return self


@register_stage("finetune", options=FinetuneOptions)
def finetune(artifact, options: FinetuneOptions, ctx: StageContext) -> StageOutput:
    """Train a classifier head (or the whole net) on the task; the result is the baseline."""
    import torch

    from compress.distill.shards import micro_batches
    from compress.distributed import device, prepare, processes

    adapter = ctx.adapter
    procs = processes()
    torch.manual_seed(ctx.seed)
    torch.set_num_threads(ctx.threads)
    dev = device()
    model = adapter.load_torch(artifact).to(dev)
    n_train = len(adapter.subset("train"))
    steps_per_epoch = math.ceil(n_train / options.batch_size)
    total = options.steps or max(1, round(options.epochs * steps_per_epoch))

    head = _head(model)
    if options.train == "head":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
    model.train()
    if options.train == "head":
        model.eval()  # keep BatchNorm statistics of the frozen body
        head.train()
    # DDP when N-wide, a sharded twin under FSDP (compress.fsdp); the model itself for one process
    trainable = prepare(model)
    wrapped = trainable.model
    opt = torch.optim.AdamW(trainable.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    warm = int(options.warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warm, total))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=options.label_smoothing)

    step, ema, start = 0, None, time.perf_counter()
    with ctx.reporter.task("finetune", total=total) as task:
        epoch = 0
        while step < total:
            for x, y in adapter.batches("train", options.batch_size, seed=ctx.seed + epoch):
                x, y = torch.from_numpy(x), torch.from_numpy(y)
                parts = micro_batches(len(y), procs.rank, procs.world, options.gradient_accumulation_steps)
                opt.zero_grad(set_to_none=True)
                batch_loss = 0.0
                for j, (lo, hi) in enumerate(parts):
                    # this part's share of the batch mean; DDP averages the ranks (compress.distill.shards)
                    weight = procs.world * (hi - lo) / len(y)
                    with contextlib.nullcontext() if j == len(parts) - 1 else trainable.no_sync():
                        loss = loss_fn(wrapped(x[lo:hi].to(dev)), y[lo:hi].to(dev)) * weight
                        loss.backward()
                    batch_loss += loss.item()
                opt.step()
                sched.step()
                step += 1
                (batch_loss,) = procs.mean([batch_loss])
                ema = batch_loss if ema is None else 0.95 * ema + 0.05 * batch_loss
                task.advance(1, info=f"running loss {ema:.4f} lr {sched.get_last_lr()[0]:.2e}")
                if step >= total:
                    break
            epoch += 1
    trainable.pull()  # FSDP: the trained full weights into `model` on every rank
    model.eval()
    if not procs.is_main:  # rank 0 holds the same model and writes it
        return StageOutput(file="", format="torch", precision="fp32")
    file = adapter.save_torch(model.cpu(), ctx.outdir)
    info = {
        "steps": step,
        "epochs": round(step / steps_per_epoch, 3),
        "final_loss_ema": round(ema or 0.0, 5),
        "train_samples": n_train,
        "seconds": round(time.perf_counter() - start, 1),
        "processes": procs.world,
        "sharded": trainable.sharded,
    }
    return StageOutput(file=file, format="torch", precision="fp32", info=info)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _head(model):  # -> torch.nn.Module
    import torch

    last = None
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            last = module
    if last is None:
        raise StageError("finetune: the model has no nn.Linear classifier head")
    return last
