"""`precision: int8, method: smoothquant`: SmoothQuant on the torch decoder, exported, then dynamic W8A8.

```yaml
- quantize: {precision: int8, method: {name: smoothquant, alpha: auto, samples: 16}, input: source, name: int8-sq}
```

Flow: load the torch artifact -> one float pass per calibration window, layer by layer, collecting each
Linear's inputs -> per scale group, `alpha` fixed or searched (`compress.quant.algorithms.smoothquant`) and
the scales folded into the norms / `v` / `up` rows and the Linears' columns (with `lm_head: int8` the final
norm -> lm_head too, the head untied from a tied embedding) -> the max logit change the folds
made on the first calibration window (float; recorded as `smoothing_max_abs_diff`) -> export with the
adapter into `_fp/` (the target's opset) -> `quantize_dynamic_int8` (the `dynamic` method's export) into
`model.onnx`. Needs a decoder with an architecture map (`compress.families.causal_lm.archs`).
"""

from __future__ import annotations

import shutil
import time
from typing import TYPE_CHECKING, Any

from compress.stages.base import StageContext, StageOutput

if TYPE_CHECKING:
    from compress.quant.algorithms import SmoothQuantOptions
    from compress.stages.quantize.int8 import Int8Options


def quantize_int8_smooth(artifact, options: Int8Options, method: SmoothQuantOptions, ctx: StageContext) -> StageOutput:
    import torch

    from compress.families.causal_lm.archs import find_arch
    from compress.quant.algorithms.int8_matmul import ACTIVATION_INFO, quantize_dynamic_int8
    from compress.quant.algorithms.sequential import as_model_kwargs
    from compress.quant.algorithms.smoothquant import smooth_model, summarize
    from compress.stages.export import export_to
    from compress.stages.quantize.common import require_quantized, torch_calibration

    torch.manual_seed(ctx.seed)
    torch.set_num_threads(ctx.threads)
    model = ctx.adapter.load_torch(artifact)
    batches = torch_calibration(ctx, method.samples, "quantize int8 (smoothquant)")
    alpha = None if method.alpha == "auto" else float(method.alpha)
    start = time.perf_counter()
    with torch.no_grad():
        probe = as_model_kwargs(batches[0])
        before = model(**probe, use_cache=False).logits
        arch = find_arch(model)  # smooth_model refuses a model without one
        layers = len(model.get_submodule(arch.layers)) if arch is not None else None
        with ctx.reporter.task(f"SmoothQuant (alpha {method.alpha})", total=layers) as task:
            report = smooth_model(
                model,
                batches,
                alpha=alpha,
                reduce_range=bool(method.reduce_range),
                per_token=method.activations == "token",
                head=options.lm_head == "int8",
                progress=lambda done, of, message: task.advance(1, info=message),
            )
        drift = float((model(**probe, use_cache=False).logits - before).abs().max())
    smooth_seconds = round(time.perf_counter() - start, 1)
    for message in report.skipped:
        ctx.reporter.log(f"  SmoothQuant group left unsmoothed: {message}")
    ctx.reporter.log(f"  smoothing: max |logit change| in float = {drift:.3g}")
    target, out = options.target, ctx.outdir / "model.onnx"
    fp = ctx.outdir / "_fp" / "model.onnx"
    start = time.perf_counter()
    with ctx.reporter.task(f"export + quantize int8 (dynamic, opset {target.export_opset})", total=None):
        fp.parent.mkdir()
        export_to(ctx.adapter, model, fp, opset=target.export_opset, dynamo=target.dynamo)
        quantize_dynamic_int8(
            fp,
            out,
            per_channel=method.per_channel,
            lm_head=options.lm_head == "int8",
            reduce_range=method.reduce_range,
            activations=method.activations,
        )
        nodes = require_quantized(out, fp, "quantize int8 (smoothquant)", "smoothquant quantizes MatMul weights only")
        shutil.rmtree(fp.parent)
    info: dict[str, Any] = {
        "method": method.name,
        "alpha": method.alpha,
        "calibration_samples": method.samples,
        **summarize(report),
        "smoothing_max_abs_diff": drift,
        "smooth_seconds": smooth_seconds,
        "seconds": round(time.perf_counter() - start, 1),
        "weights": "int8 per-channel" + (" (7-bit range)" if method.reduce_range else ""),
        "activations": ACTIVATION_INFO[method.activations],
        "reduce_range": method.reduce_range,
        "lm_head": options.lm_head,
        "quantized_nodes": nodes,
    }
    return StageOutput(file="model.onnx", format="onnx", precision="int8", info=info, target=target.name)
