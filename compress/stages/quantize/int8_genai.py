"""`precision: int8, target: onnxruntime-genai`: onnxruntime-genai's fused decoder from our 8-bit weights.

```yaml
- quantize: {precision: int8, target: onnxruntime-genai, group_size: 32, input: source, name: genai-int8}
- quantize: {precision: int8, target: onnxruntime-genai, group_size: 64, group_sizes: {mlp.down_proj: 512},
             input: source, name: genai-int8-g64}
```

`group_sizes` gives units their own group (a Linear's full name or a suffix matched at a dot: `mlp.down_proj`
is every layer's down projection): fewer scales where the in-features allow (SmolLM2: 576 = 9 x 64 everywhere
but down_proj's 1536 = 3 x 512). Every group, `group_size` included, must divide its unit's in-features (a
padded last block would hold scales for columns that do not exist): refused before any work, naming the unit
and its K, as a key that names no Linear, or one Linear named by two keys. The builder packs q/k/v into one
MatMulNBits, so they need one group (refused by `build_fused_decoder`).

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
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator

from compress.errors import StageError
from compress.quant.scheme import GroupSize
from compress.stages.base import StageContext, StageOutput

if TYPE_CHECKING:
    from compress.stages.quantize.int8 import Int8Options


def _check_units(value: dict[str, int]) -> dict[str, int]:
    bad = [key for key in value if not key or key.startswith(".") or key.endswith(".")]
    if bad:
        raise ValueError(f"group_sizes keys {bad}: a Linear's name or a suffix of it (e.g. mlp.down_proj)")
    return value


#: `group_sizes`: {Linear name or dotted suffix: group size}
UnitGroupSizes = Annotated[dict[str, GroupSize], AfterValidator(_check_units)]


def unit_group_sizes(model: Any, group_size: int, group_sizes: dict[str, int]) -> dict[str, int]:
    """{Linear name: its group} for every Linear of `model` (lm_head included), or a StageError naming the unit.

    A unit takes the group of the key naming it (`group_sizes`), else `group_size`; the group must divide the
    unit's in-features."""
    import torch

    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    resolved, used = {}, set()
    for name, module in linears.items():
        keys = [k for k in group_sizes if name == k or name.endswith("." + k)]
        if len(keys) > 1:
            raise StageError(f"quantize int8: group_sizes keys {keys} all name {name}; keep one")
        used.update(keys)
        group = group_sizes[keys[0]] if keys else group_size
        k = module.in_features
        if k % group:
            said = f"group_sizes[{keys[0]!r}]" if keys else "group_size"
            raise StageError(
                f"quantize int8: {said} = {group} does not divide {name}'s in-features K = {k} (the last block "
                f"would be padded); allowed here: a power of two >= 16 dividing {k}"
            )
        resolved[name] = group
    if unknown := sorted(set(group_sizes) - used):
        suffixes = sorted({n.split(".", 3)[-1] if n.startswith("model.layers.") else n for n in linears})
        raise StageError(f"quantize int8: group_sizes {unknown} name no Linear of the model; its units: {suffixes}")
    return resolved


def zero_point_count(path: Any) -> int:
    """Zero-point inputs of the quantized nodes of the ONNX file `path` (graph only)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    kinds = ("MatMulNBits", "GatherBlockQuantized")
    return sum(1 for n in model.graph.node if n.op_type in kinds and len(n.input) > 3 and n.input[3])


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
    groups = unit_group_sizes(model, options.group_size, options.group_sizes)
    config = WeightQuantConfig(bits=8, group_size=options.group_size, symmetric=True)
    overrides = {
        name: WeightQuantConfig(bits=8, group_size=g, symmetric=True)
        for name, g in groups.items()
        if g != options.group_size
    }
    with torch.no_grad():
        qws = rtn_quantize_model(model, config=config, overrides=overrides, layers_filter=lambda name, module: True)
    build_into_outdir(
        model, qws, ctx, target, precision="int8", block_size=options.group_size, symmetric=True, lm_head="int8"
    )
    out = ctx.outdir / "model.onnx"
    counts = op_counts(out)
    info: dict[str, Any] = {
        "method": "rtn",
        "weights": f"int8 symmetric RTN, groups of {options.group_size}"
        + "".join(f", {k} {g}" for k, g in options.group_sizes.items())
        + " (MatMulNBits, fp16-rounded scales)",
        "group_size": options.group_size,
        **({"group_sizes": dict(options.group_sizes)} if options.group_sizes else {}),
        "zero_point_inputs": zero_point_count(out),  # 0: symmetric, the kernels' default (compress.genai.rewrite)
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
