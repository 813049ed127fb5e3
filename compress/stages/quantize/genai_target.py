"""`target: onnxruntime-genai` of `precision: int4`: onnxruntime-genai's fused decoder from our INT4 weights.

```yaml
- quantize: {precision: int4, method: gptq, group_size: 32, target: onnxruntime-genai}
- quantize: {precision: int4, method: gptq, group_size: 32, target: {name: onnxruntime-genai, execution_provider: cuda}}
```

Flow (after the torch model is quantized in place, `int4.py`): save it with its tokenizer as a Hugging Face
folder `_hf` inside the stage's out dir -> `compress.genai.build.build_fused_decoder` with our
`{module: QuantizedWeight}` (the builder's GPTQ loader reads them; codes, zero points and fp16 scales come
through unchanged, tests/genai) -> the builder's folder (model.onnx + data, genai_config.json, tokenizer
files) becomes the artifact and `_hf` is removed.

What the builder cannot take is refused: at validate (`refusals`) `keep` (a float Linear would get the
builder's own RTN), `opset` / `dynamo` (the builder writes its own graph), a family other than a decoder
LLM (`Adapter.int4_targets`); at run, before any work (`refuse_architecture`), an architecture outside
`GPTQ_ARCHITECTURES` (config.json is not read at validate); an act-order checkpoint with a g_idx is refused
by `build_fused_decoder`. (The group size is a power of two >= 16 for every target, `GroupSize`.)
`lm_head: int8` is the builder's own 8-bit RTN (the builder reads one `bits` per checkpoint); `int4` is ours: GPTQ
on the head's calibration inputs when the method runs GPTQ (`int4.head_quantizer`), stored once for the tied
embedding (GatherBlockQuantized reads the head's codes).

`streamed: true` (`build_streamed_artifact`, method rtn, gptq or awq): no torch model at all;
`compress.quant.streamed` quantizes the input folder's safetensors one decoder layer at a time into the builder's
GPTQ layout (per-layer files in the adapter's cache, so a killed run resumes; `activation_dtype` says how the
hidden states between layers are kept) and the builder reads that folder.

The `cuda` flavour (fp16 I/O) is built on the CPU; it runs on an NVIDIA GPU only, so its parity check,
evaluation and benchmark are not run here (`StageOutput.unmeasured`) and no figure is recorded for it.
"""

from __future__ import annotations

import os
import shutil
from importlib import metadata
from typing import TYPE_CHECKING, Any

from compress.errors import StageError
from compress.stages.base import StageContext, StageOutput

if TYPE_CHECKING:
    from compress.stages.quantize.int4 import Int4Options

GENAI_DIST = "onnxruntime-genai"
NEEDS_GPU = "needs an NVIDIA GPU (onnxruntime-genai graph for execution_provider cuda)"


def genai_version() -> str | None:
    """The installed onnxruntime-genai (its builder writes the graph, so its version joins the cache key)."""
    try:
        return metadata.version(GENAI_DIST)
    except metadata.PackageNotFoundError:
        return None


def refusals(options: Int4Options) -> list[tuple[str, str]]:
    """What the builder cannot take, as (key, reason): the validate-time checks of this target."""
    target, problems = options.target, []
    if options.keep:
        problems.append(
            ("keep", "target onnxruntime-genai: its builder quantizes every float MatMul itself (RTN); remove keep")
        )
    for key in ("opset", "dynamo"):
        if key in target.model_fields_set:
            problems.append(("target", f"{key}: onnxruntime-genai's builder writes its own graph; remove it"))
    return problems


def refuse_architecture(model: Any) -> None:
    """StageError (before any quantization) when the builder's GPTQ loader cannot read this architecture."""
    from compress.genai.build import GPTQ_ARCHITECTURES

    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    if arch not in GPTQ_ARCHITECTURES:
        raise StageError(
            f"quantize int4: target onnxruntime-genai takes our quantized weights for "
            f"{', '.join(sorted(GPTQ_ARCHITECTURES))} only (Llama tensor names); this model is {arch}: "
            "use target: onnxruntime-cpu"
        )


def build_genai_artifact(
    model: Any, qws: dict[str, Any], options: Int4Options, ctx: StageContext, info: dict[str, Any], mixed: bool = False
) -> StageOutput:
    """Save `model`, build the fused graph from `qws` into `ctx.outdir`, check parity (cpu flavour).

    `mixed`: `qws` holds 8-bit weights beside the 4-bit ones (`compress.stages.quantize.mixed`)."""
    from compress.stages.quantize.common import op_counts, quantized_nodes

    target = options.target  # an OnnxruntimeGenai: the caller dispatches on target.fused_decoder
    first = next(iter(qws.values()))
    build_into_outdir(
        model,
        qws,
        ctx,
        target,
        precision="int4",
        block_size=first.group_size,
        symmetric=first.symmetric,
        lm_head=f"int{qws['lm_head'].bits}" if mixed and "lm_head" in qws else options.lm_head,
        mixed=mixed,
    )
    out = ctx.outdir / "model.onnx"
    info.update(
        builder=f"{GENAI_DIST} {genai_version()}",
        execution_provider=target.execution_provider,
        accuracy_level=target.accuracy_level,
        quantized_nodes=quantized_nodes(counts := op_counts(out)),
        fused_ops=fused_ops(counts),
        lm_head_quantizer=_head_quantizer(options),
    )
    unmeasured = None if target.runs_on_cpu else NEEDS_GPU
    if unmeasured:
        info["parity"] = f"not run: {unmeasured}"
        ctx.reporter.log(f"  parity, evaluation and benchmark not run: {unmeasured}")
    else:
        from compress.stages.quantize.int4 import dequantized_parity

        info.update(dequantized_parity(model, out, options, ctx))
    return StageOutput(
        file="model.onnx", format="onnx", precision="int4", info=info, target=target.name, unmeasured=unmeasured
    )


def _head_quantizer(options: Int4Options) -> str | None:
    """Who quantized the lm_head in the shipped file (None: float)."""
    from compress.stages.quantize.int4 import head_quantizer

    if options.lm_head == "int8":
        return "onnxruntime-genai builder (RTN)"
    how = head_quantizer(options)
    return f"ours ({how.upper()})" if how else None


def build_into_outdir(
    model: Any,
    qws: dict[str, Any],
    ctx: StageContext,
    target: Any,
    *,
    precision: str,
    block_size: int,
    symmetric: bool,
    lm_head: str,
    mixed: bool = False,
) -> None:
    """Save `model`, run the builder on it with our weights `qws` for `target` (an OnnxruntimeGenai), and move
    the files it writes into `ctx.outdir` (the int4 and int8 genai stages share this)."""
    from compress.genai.build import build_fused_decoder

    hf, built = ctx.outdir / "_hf", ctx.outdir / "_genai"
    with ctx.reporter.task(f"onnxruntime-genai builder, {precision} ({target.execution_provider})", total=None):
        ctx.adapter.save_torch(model, hf)
        try:
            build_fused_decoder(
                hf,
                built,
                precision=precision,
                quantized=qws,
                execution_provider=target.execution_provider,
                accuracy_level=target.accuracy_level,
                block_size=block_size,
                symmetric=symmetric,
                lm_head=lm_head,
                mixed=mixed,
                prune_lm_head=target.prune_lm_head,
            )
        except ValueError as e:  # weights the builder cannot take (e.g. an act-order checkpoint)
            raise StageError(f"quantize {precision} → onnxruntime-genai: {e}") from None
        finally:
            shutil.rmtree(hf, ignore_errors=True)
        for path in sorted(built.iterdir()):
            os.replace(path, ctx.outdir / path.name)
        built.rmdir()


def streamed_refusals(options: Int4Options) -> list[tuple[str, str]]:
    """`streamed: true` is layer-streamed RTN / GPTQ / AWQ into this target's builder (`compress.quant.streamed`)."""
    problems = []
    if options.method.name not in ("rtn", "gptq", "awq"):
        problems.append(("streamed", f"method {options.method.name}: streamed takes rtn, gptq or awq"))
    if options.activation_dtype != "float32" and options.method.name == "rtn":
        problems.append(("activation_dtype", "streamed rtn keeps no activations; it is for method gptq or awq"))
    if not options.target.fused_decoder:
        problems.append(("streamed", f"target {options.target.name}: streamed needs target: onnxruntime-genai"))
    if options.lm_head == "int8":
        problems.append(("lm_head", "streamed: allowed float, int4 (8-bit heads are the builder's, from float)"))
    return problems


def build_streamed_artifact(artifact: Any, options: Int4Options, ctx: StageContext) -> StageOutput:
    """Layer-streamed RTN / GPTQ / AWQ of the input's safetensors folder, then the fused graph written layer by layer.

    The per-layer files live in the adapter's cache (keyed by this artifact's key), so a killed run resumes at
    the first unfinished layer; they are removed once the artifact is complete. No dequantized parity check:
    it needs the float model, which this path never loads; the evaluation measures the shipped file.
    """
    import json

    from compress.genai.build import GPTQ_ARCHITECTURES
    from compress.quant.streamed import build_streamed_decoder, stream_quantize
    from compress.stages.quantize.common import torch_calibration
    from compress.stages.quantize.int4 import method_config

    config = json.loads((artifact.path / "config.json").read_text())
    arch = (config.get("architectures") or ["<none>"])[0]
    if arch not in GPTQ_ARCHITECTURES:
        raise StageError(
            f"quantize int4 (streamed): {arch} is not one of {', '.join(sorted(GPTQ_ARCHITECTURES))} "
            "(the builder's GPTQ loader reads Llama tensor names)"
        )
    work = ctx.adapter.cache_dir / "streamed" / ctx.key[:20]
    method = options.method
    cfg = method_config(options, ctx)  # the in-memory stage's mapping (`streamed_refusals`: rtn, gptq or awq)
    calibration = None if method.name == "rtn" else torch_calibration(ctx, method.samples, "quantize int4")
    result = stream_quantize(
        ctx.adapter.weights_folder(artifact),  # a linked source's folder, its files verified first
        work,
        cfg,
        lm_head=options.lm_head,
        calibration=calibration,
        activation_dtype=options.activation_dtype,
        say=ctx.reporter.log,
    )
    built = ctx.outdir / "_genai"
    with ctx.reporter.task(f"onnxruntime-genai builder ({options.target.execution_provider}, streamed)", total=None):
        build_streamed_decoder(
            work,
            built,
            lm_head=options.lm_head,
            accuracy_level=options.target.accuracy_level,
            execution_provider=options.target.execution_provider,
            prune_lm_head=options.target.prune_lm_head,
            say=ctx.reporter.log,
        )
    for path in sorted(built.iterdir()):
        os.replace(path, ctx.outdir / path.name)
    built.rmdir()
    shutil.rmtree(work, ignore_errors=True)
    seconds = [t.seconds for t in result.layers]
    from compress.stages.quantize.common import op_counts

    info = {
        **method.model_dump(mode="json", exclude={"name"}),  # as the in-memory stage's info (then, samples, ..)
        "method": method.name,
        "group_size": options.group_size,
        "symmetric": options.symmetric,
        "lm_head": options.lm_head,
        "lm_head_quantizer": _head_quantizer(options),
        "streamed": True,
        "activation_dtype": options.activation_dtype,
        "layers_streamed": len(seconds),
        "layers_reused": sum(t.reused for t in result.layers),
        "layer_seconds_mean": round(sum(seconds) / len(seconds), 2),
        "builder": f"{GENAI_DIST} {genai_version()}",
        "fused_ops": fused_ops(op_counts(ctx.outdir / "model.onnx")),
        "parity": "not run: streamed (the float model is never loaded); the evaluation measures the file",
    }
    if method.name == "awq":
        info["awq_groups_unscaled"] = list(result.awq_unscaled)
    unmeasured = None if options.target.runs_on_cpu else NEEDS_GPU
    return StageOutput(
        file="model.onnx", format="onnx", precision="int4", info=info, target=options.target.name, unmeasured=unmeasured
    )


def fused_ops(counts: Any) -> dict[str, int]:
    fused = ("GroupQueryAttention", "SkipSimplifiedLayerNormalization", "MatMulNBits", "GatherBlockQuantized")
    return {op: counts[op] for op in fused if counts.get(op)}
