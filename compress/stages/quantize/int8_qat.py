"""`precision: int8, method: static, qat: {...}`: a short quantization-aware fine-tune, then static Q/DQ.

```yaml
- quantize: {precision: int8, method: {name: static, calibrator: percentile, samples: 512}, input: finetune,
             qat: {steps: 300, lr: 1.0e-5, batch_size: 32}}
```

Flow: load the torch artifact -> BatchNorm folded and fake-quant added in ORT's arithmetic for the stage's
weight / activation settings (`compress.quant.qat`) -> activation ranges from min/max on `method.samples`
calibration images -> `steps` AdamW steps on `data.train` with the task loss (cross-entropy), model in
eval mode (BN folded, dropout off), learning rate warm-up + cosine as `finetune` -> the float model with its
trained weights exported by the adapter into `_qat/` (the target's opset: 17 as `export`'s default) -> the
normal static path on that graph (`_static`: ranges from the method's calibrator, the same Q/DQ layout,
`bias_correction` if set) into `model.onnx`.

One process, a loop of its own: `finetune`'s loop is built around DDP / FSDP wrapping and saving a torch
artifact, neither of which applies to a few hundred steps whose result is exported at once.
"""

from __future__ import annotations

import math
import shutil
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from compress.errors import StageError
from compress.schema import Count, Real
from compress.stages.base import StageContext, StageOutput

if TYPE_CHECKING:
    from compress.quant.algorithms import StaticOptions
    from compress.stages.quantize.int8 import Int8Options

#: bump when the QAT arithmetic or loop changes what it trains (joins the cache key)
VERSION = 1
#: training losses kept at each end of the curve in the artifact's info
_CURVE_ENDS = 20


class QatOptions(BaseModel):
    """`qat:` of static INT8: fake-quant fine-tune steps on data.train before the Q/DQ graph is written."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: Count = Field(300, gt=0, description="optimizer steps on data.train")
    lr: Real = Field(1e-5, gt=0, description="peak learning rate (AdamW, warm-up then cosine)")
    batch_size: Count = Field(32, gt=0)
    weight_decay: Real = Field(0.0, ge=0)
    warmup: Real = Field(0.05, ge=0, lt=1, description="fraction of steps with linear warm-up")


def quantize_int8_qat(artifact, options: Int8Options, method: StaticOptions, ctx: StageContext) -> StageOutput:
    import torch

    from compress.quant.qat import QatScheme, prepare
    from compress.stages.export import export_to
    from compress.stages.finetune import _lr_factor
    from compress.stages.quantize.common import require_quantized, torch_calibration
    from compress.stages.quantize.int8 import _static

    qat, target = options.qat, options.target
    assert qat is not None  # quantize_int8 dispatches here only with qat set
    torch.manual_seed(ctx.seed)
    torch.set_num_threads(ctx.threads)
    model = ctx.adapter.load_torch(artifact)
    attention = [
        type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.LayerNorm | torch.nn.MultiheadAttention)
    ]
    if attention:
        raise StageError(
            f"quantize int8: qat simulates a CNN's static INT8 (every Add and pooling quantized); this model has "
            f"{attention[0]} layers, whose graph keeps them float; remove qat"
        )
    scheme = QatScheme(
        per_channel=method.per_channel,
        reduce_range=bool(method.reduce_range),
        symmetric_activations=target.symmetric_activations,
    )
    prepared = prepare(model, scheme)
    net = prepared.module
    calib = torch_calibration(ctx, method.samples, "quantize int8 (qat)")
    prepared.set_mode("observe")
    with torch.no_grad():
        for batch in calib:
            net(*batch)
    prepared.set_mode("train")
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=qat.lr, weight_decay=qat.weight_decay)
    warm = int(qat.warmup * qat.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warm, qat.steps))
    loss_fn = torch.nn.CrossEntropyLoss()
    losses: list[float] = []
    start, epoch = time.perf_counter(), 0
    with ctx.reporter.task(f"QAT ({qat.steps} steps, lr {qat.lr:g})", total=qat.steps) as task:
        while len(losses) < qat.steps:
            for x, y in ctx.adapter.batches("train", qat.batch_size, seed=ctx.seed + epoch):
                loss = loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y))
                if not math.isfinite(loss.item()):
                    raise StageError(
                        f"quantize int8: qat loss became {loss.item()} at step {len(losses) + 1}; lower qat.lr"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                task.advance(1, info=f"loss {loss.item():.4f}")
                if len(losses) >= qat.steps:
                    break
            epoch += 1
    train_seconds = round(time.perf_counter() - start, 1)
    fake_weights = len(prepared.weights)
    float_model = prepared.strip()
    fp = ctx.outdir / "_qat" / "model.onnx"
    fp.parent.mkdir()
    with ctx.reporter.task(f"export the QAT model (opset {target.export_opset})", total=None):
        export_to(ctx.adapter, float_model, fp, opset=target.export_opset, dynamo=target.dynamo)
    out = _static(SimpleNamespace(main=fp, name=artifact.name), options, method, ctx)
    nodes = require_quantized(ctx.outdir / out.file, fp, "quantize int8 (qat)", "check op_types")
    shutil.rmtree(fp.parent)
    n = min(_CURVE_ENDS, len(losses))
    info: dict[str, Any] = {
        **out.info,
        "quantized_nodes": nodes,
        "qat": {
            **qat.model_dump(mode="json"),
            "batchnorms_folded": prepared.folded,
            "fake_quant_weights": fake_weights,
            "fake_quant_activations": len(prepared.activations),
            "loss_start": round(sum(losses[:n]) / n, 5),
            "loss_end": round(sum(losses[-n:]) / n, 5),
            "loss_mean_of": n,
            "train_samples": qat.steps * qat.batch_size,
            "seconds": train_seconds,
        },
    }
    return StageOutput(file=out.file, format=out.format, precision=out.precision, info=info, target=out.target)
