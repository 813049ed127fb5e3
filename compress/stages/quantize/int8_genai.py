"""`precision: int8, target: onnxruntime-genai`: onnxruntime-genai's fused decoder from our 8-bit weights.

```yaml
- quantize: {precision: int8, target: onnxruntime-genai, group_size: 32, input: source, name: genai-int8}
```

Flow: load the torch artifact -> RTN at 8 bits of every Linear, lm_head included (symmetric, groups of
`group_size` along K; the weights then hold their dequantized values) -> `build_fused_decoder(precision=
"int8")`: our codes in the AutoGPTQ layout at bits=8, which the builder's GPTQ loader turns into 8-bit
MatMulNBits unchanged (scales rounded to fp16, tests/genai), and the tied embedding read from the lm_head's
8-bit codes by GatherBlockQuantized (the table stored once) -> parity of ONNX Runtime against the
dequantized torch model (report only: `accuracy_level` 4 quantizes activations inside the kernel).

Why RTN and not GPTQ here: at 8 bits RTN's rounding error is 1/16 of 4 bits' and what is left on
SmolLM2 is dominated by the int8 activations of `accuracy_level` 4 (README), so GPTQ would spend minutes
for a difference the perplexity cannot show; the int4 stage has GPTQ for the bits where it matters.
An untied embedding stays a float Gather (the builder's GatherBlockQuantized path is for tied tables).
The refusals of this target (architecture, `lm_head: float`, other methods) are in `Int8Options`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from compress.stages.base import StageContext, StageOutput

if TYPE_CHECKING:
    from compress.stages.quantize.int8 import Int8Options

#: decode steps of the parity check (the int4 stage's default `parity_samples`)
PARITY_SAMPLES = 8


def quantize_int8_genai(artifact, options: Int8Options, ctx: StageContext) -> StageOutput:
    import torch

    from compress.quant.algorithms.rtn import rtn_quantize_model
    from compress.quant.primitives.weight import WeightQuantConfig
    from compress.stages.quantize.common import op_counts, quantized_nodes
    from compress.stages.quantize.genai_target import (
        GENAI_DIST,
        NEEDS_GPU,
        build_into_outdir,
        fused_ops,
        genai_version,
        refuse_architecture,
    )

    target = options.target
    torch.manual_seed(ctx.seed)
    torch.set_num_threads(ctx.threads)
    model = ctx.adapter.load_torch(artifact)
    refuse_architecture(model)
    start = time.perf_counter()
    config = WeightQuantConfig(bits=8, group_size=options.group_size, symmetric=True)
    with torch.no_grad():
        qws = rtn_quantize_model(model, config=config, layers_filter=lambda name, module: True)
    build_into_outdir(
        model, qws, ctx, target, precision="int8", block_size=options.group_size, symmetric=True, lm_head="int8"
    )
    out = ctx.outdir / "model.onnx"
    counts = op_counts(out)
    info: dict[str, Any] = {
        "method": "rtn",
        "weights": f"int8 symmetric RTN, groups of {options.group_size} (MatMulNBits, fp16-rounded scales)",
        "group_size": options.group_size,
        "lm_head": "int8",
        "embedding": "tied: the lm_head's 8-bit codes (GatherBlockQuantized)"
        if counts.get("GatherBlockQuantized")
        else "float (untied)",
        "builder": f"{GENAI_DIST} {genai_version()}",
        "execution_provider": target.execution_provider,
        "accuracy_level": target.accuracy_level,
        "quantized_nodes": quantized_nodes(counts),
        "fused_ops": fused_ops(counts),
        "seconds": round(time.perf_counter() - start, 1),
    }
    unmeasured = None if target.runs_on_cpu else NEEDS_GPU
    if unmeasured:
        info["parity"] = f"not run: {unmeasured}"
        ctx.reporter.log(f"  parity, evaluation and benchmark not run: {unmeasured}")
    else:
        parity = ctx.adapter.check_export(
            model,
            out,
            samples=PARITY_SAMPLES,
            atol=float("inf"),
            rtol=0.0,
            threads=ctx.threads,
            raise_on_failure=False,
        )
        ctx.reporter.log(f"  parity: max |onnx - dequantized torch| logit = {parity['parity_max_abs_diff']:.3g}")
        info.update(parity)
    return StageOutput(
        file="model.onnx", format="onnx", precision="int8", info=info, target=target.name, unmeasured=unmeasured
    )
