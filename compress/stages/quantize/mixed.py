"""`mixed:` of `quantize: {precision: int4, target: onnxruntime-genai}`: 4/8 bits per MatMulNBits under a size budget.

```yaml
- quantize: {precision: int4, method: {name: awq, then: gptq}, group_size: 32, lm_head: int4,
             target: onnxruntime-genai, mixed: {max_mb: 100, windows: 2, group_size: 64}}
```

Flow (`quantize_mixed`): the units are the fused graph's MatMulNBits (`compress.quant.mixed.fused_units`) and
their sizes are exact, so the budget is checked first: below the all-4-bit file it is refused (naming that
minimum), at or above the all-8-bit file it is refused too (then nothing is mixed: use `precision: int8`).
The float model's logits on `windows` calibration windows held apart from the method's `samples` are kept,
the model is quantized at 4 bits by the method (the float weights each Linear had when quantized are kept
beside: AWQ-scaled for AWQ, `on_float`), the lm_head at 4 bits as `lm_head: int4` says; that state is cached
in the adapter's cache (safetensors, keyed on everything but `mixed`), so every budget and 8-bit group size of
a pipeline starts from the same 4-bit weights after one AWQ/GPTQ pass. Sensitivity: per unit,
the KL won back on those windows when only it is at 8 bits (RTN of its float weights at `mixed.group_size`,
near lossless), cached (JSON) keyed on the 4-bit weights' key, `windows` and the 8-bit group size, so a
second budget reuses it. Units go to 8 bits greedily by KL gain per MB while the file stays within `max_mb`, the
builder writes them as 8-bit MatMulNBits (`build_fused_decoder(mixed=True)`), and the weight file
(`model.onnx.data`) must have exactly the predicted size (a StageError names both otherwise).

With `accuracy_budget:` beside it (compress/stages/quantize/mixed_budget.py) `max_mb` is optional (a cap) and
the units taken are the shortest prefix of that greedy order that holds a perplexity rise on held-apart
windows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from compress.errors import StageError
from compress.quant.scheme import GroupSize
from compress.schema import PositiveCount, Real
from compress.stages.quantize.common import cached_table

if TYPE_CHECKING:
    from compress.stages.base import StageContext, StageOutput
    from compress.stages.quantize.int4 import Int4Options

WEIGHT_FILE = "model.onnx.data"


class MixedOptions(BaseModel):
    """`mixed: {max_mb: 100, windows: 2, group_size: 64}`: which MatMulNBits go to 8 bits within `max_mb`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_mb: Real | None = Field(
        None,
        gt=0,
        description="largest weight file (model.onnx.data), MB = 10^6 bytes; required unless accuracy_budget is "
        "given (then an optional cap)",
    )
    windows: PositiveCount = Field(
        2, description="calibration windows after the method's `samples`, held apart, on which sensitivity is measured"
    )
    group_size: GroupSize | None = Field(
        None, description="group size of the 8-bit units (default: the stage's group_size); larger = cheaper units"
    )


def refusals(options: Int4Options) -> list[tuple[str, str]]:
    """What `mixed` cannot be combined with, as (key, reason)."""
    problems = []
    target = options.target
    if not target.fused_decoder:
        problems.append(("mixed", f"target {target.name}: mixed needs target: onnxruntime-genai (its MatMulNBits)"))
    elif not target.runs_on_cpu:
        problems.append(("mixed", "execution_provider cuda: the size prediction and sensitivity are the CPU graph's"))
    if options.lm_head != "int4":
        problems.append(("lm_head", "mixed: the lm_head is a unit (4 bits, 8 if chosen): set lm_head: int4"))
    if options.method.name == "checkpoint":
        problems.append(("mixed", "method checkpoint: its codes are fixed; mixed needs rtn, gptq, awq or autoround"))
    if options.streamed:
        problems.append(("mixed", "streamed: true never holds the float model the sensitivity needs"))
    if options.mixed.max_mb is None and options.accuracy_budget is None:
        problems.append(
            ("mixed", "max_mb: required (the size budget) unless accuracy_budget is given; add mixed.max_mb")
        )
    return problems


def _held_apart(ctx: StageContext, options: Int4Options) -> list[dict[str, Any]]:
    from compress.stages.quantize.common import torch_calibration

    skip = getattr(options.method, "samples", 0)
    want = options.mixed.windows
    batches = torch_calibration(ctx, skip + want, "quantize int4 mixed")[skip:]
    if len(batches) < want:
        raise StageError(
            f"quantize int4 mixed: sensitivity needs {skip + want} calibration windows (method.samples {skip} + "
            f"mixed.windows {want} held apart), data.calibration_windows gives {skip + len(batches)}; raise "
            "data.calibration_windows or lower mixed.windows"
        )
    return batches


def _sizes(model: Any, names: list[str], options: Int4Options) -> tuple[list[Any], dict[str, int], int, int]:
    """(units, extra bytes of each unit at 8 bits, all-4-bit file bytes, all-8-bit file bytes)."""
    from compress.quant.mixed import fixed_bytes, fused_units, unit_bytes

    modules = dict(model.named_modules())
    units = fused_units({n: tuple(modules[n].weight.shape) for n in names})
    g4, g8 = options.group_size, options.mixed.group_size or options.group_size
    four = {u.node: unit_bytes(u, 4, g4) for u in units}
    eight = {u.node: unit_bytes(u, 8, g8) for u in units}
    fixed = fixed_bytes(model.config)
    return units, {n: eight[n] - four[n] for n in four}, fixed + sum(four.values()), fixed + sum(eight.values())


def _refuse_budget(options: Int4Options, low: int, high: int) -> None:
    if options.mixed.max_mb is None:  # an accuracy budget without a size cap
        return
    max_bytes = options.mixed.max_mb * 1e6
    if max_bytes < low:
        raise StageError(
            f"quantize int4 mixed: max_mb = {options.mixed.max_mb:g} is below the all-4-bit file "
            f"({low / 1e6:.2f} MB at group {options.group_size}), the minimum; raise mixed.max_mb"
        )
    if max_bytes >= high:
        raise StageError(
            f"quantize int4 mixed: max_mb = {options.mixed.max_mb:g} holds every unit at 8 bits "
            f"({high / 1e6:.2f} MB): that is not mixed; lower mixed.max_mb or use precision: int8 "
            "(with accuracy_budget: remove mixed.max_mb for no cap)"
        )


def quantization_key(artifact: Any, options: Int4Options, ctx: StageContext) -> str:
    """What the 4-bit quantization depends on: the input, every option but `mixed`, `accuracy_budget`, the target's
    `prune_lm_head` (a graph choice) and the name, the data, the seed."""
    from compress.hashing import sha256_json

    fields = {k: v for k, v in options.cache_fields().items() if k not in ("mixed", "accuracy_budget")}
    fields["target"] = {k: v for k, v in fields["target"].items() if k != "prune_lm_head"}
    return sha256_json(
        {
            "artifact": [artifact.key, artifact.content_digest],
            "options": fields,
            "calibration": ctx.adapter.data_hashes().get("calibration"),
            "seed": ctx.seed,
        }
    )


def sensitivity_key(quantized_key: str, options: Int4Options) -> str:
    """The sensitivity table's key: the 4-bit model's, the held-apart windows and the 8-bit group size."""
    from compress.hashing import sha256_json

    g8 = options.mixed.group_size or options.group_size
    return sha256_json({"quantized": quantized_key, "windows": options.mixed.windows, "group_size_8bit": g8})


def _quantized_model(
    model: Any, key: str, options: Int4Options, ctx: StageContext
) -> tuple[dict[str, Any], dict[str, Any], list[str], bool]:
    """Quantize `model` in place at 4 bits (method, then the lm_head), or restore that from the adapter's cache.

    Returns ({name: QuantizedWeight}, {name: the float weight each Linear had when quantized}, AWQ groups
    left unscaled, reused). The cache (one safetensors file: the model's state, the float weights, the codes)
    lets every budget of a pipeline share one AWQ/GPTQ pass."""
    import json

    import torch

    from compress.quant.primitives.weight import QuantizedWeight
    from compress.stages.quantize.int4 import _quantize, _quantize_head
    from compress.tensorfile import read_tensors, write_tensors

    path = ctx.adapter.cache_dir / "mixed-quantized" / f"{key[:32]}.safetensors"
    if path.exists():
        tensors, meta = read_tensors(path)
        if meta.get("key") == key:
            model.load_state_dict({k[len("state.") :]: v for k, v in tensors.items() if k.startswith("state.")})
            floats = {k[len("float.") :]: v for k, v in tensors.items() if k.startswith("float.")}
            qws = {
                name: QuantizedWeight(
                    tensors[f"q.{name}.qweight"], tensors[f"q.{name}.scales"], tensors[f"q.{name}.zeros"], g, b, sym
                )
                for name, (b, g, sym) in json.loads(meta["qws"]).items()
            }
            return qws, floats, json.loads(meta["unscaled"]), True
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    qws, _, unscaled = _quantize(model, options, ctx, on_float=lambda n, w: floats.__setitem__(n, w.detach().clone()))
    _quantize_head(model, options, qws, ctx)
    if any(not qw.has_trivial_g_idx() for qw in qws.values()):
        raise StageError("quantize int4 mixed: act-order without static groups (a g_idx) is not taken by the builder")
    tensors = {f"state.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"float.{k}": v for k, v in floats.items()})
    for name, qw in qws.items():
        tensors.update({f"q.{name}.qweight": qw.qweight, f"q.{name}.scales": qw.scales, f"q.{name}.zeros": qw.zeros})
    meta = {
        "key": key,
        "qws": json.dumps({n: [qw.bits, qw.group_size, qw.symmetric] for n, qw in qws.items()}),
        "unscaled": json.dumps(unscaled),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(path, tensors, meta)
    return qws, floats, unscaled, False


def quantize_mixed(artifact: Any, model: Any, options: Int4Options, ctx: StageContext) -> StageOutput:
    """The `mixed` int4 branch after the model is loaded (see the module docstring)."""
    import time

    import torch

    from compress.quant.mixed import choose_units, eight_bit_weights, model_logits, unit_sensitivity
    from compress.stages.quantize import mixed_budget as budget
    from compress.stages.quantize.genai_target import build_genai_artifact
    from compress.stages.quantize.int4 import _scheme_info

    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is None or emb is None or head.weight is not emb.weight:
        raise StageError(
            "quantize int4 mixed: needs a tied lm_head / embedding (one table the graph stores once); the size "
            "of an untied embedding is the builder's choice, not predicted here"
        )
    head_name = next(n for n, m in model.named_modules() if m is head)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    units, costs, low, high = _sizes(model, linears, options)
    _refuse_budget(options, low, high)
    batches = _held_apart(ctx, options)
    start = time.perf_counter()
    with ctx.reporter.task("mixed: float logits on the held-apart windows", total=None):
        reference = model_logits(model, batches)
        judged = None if options.accuracy_budget is None else budget.Slice.measure(model, options, ctx)
    qkey = quantization_key(artifact, options, ctx)
    qws, floats, unscaled, quantized_reused = _quantized_model(model, qkey, options, ctx)
    if quantized_reused:
        ctx.reporter.log("  4-bit weights reused from the cache (same input, method, scheme, data and seed)")
    missing = sorted(set(linears) - set(qws))
    if missing:
        raise StageError(f"quantize int4 mixed: Linears left unquantized by the method: {missing[:5]}")
    g8 = options.mixed.group_size or options.group_size
    eight = eight_bit_weights(floats, linears, g8, options.symmetric)
    del floats
    dequant = {n: qw.dequantize(torch.float32) for n, qw in eight.items()}

    def compute() -> dict[str, Any]:
        began = time.perf_counter()
        with ctx.reporter.task("mixed: sensitivity (one unit at 8 bits at a time)", total=len(units)) as task:
            table = unit_sensitivity(model, units, dequant, batches, reference, progress=lambda n: task.advance(1))
        seconds = time.perf_counter() - began
        how = "each probe restarted at its unit's layer" if table["restarted"] else "whole-model probes"
        ctx.reporter.log(
            f"  sensitivity: {seconds:.0f} s, {seconds / len(units):.1f} s per unit on {torch.get_num_threads()} "
            f"thread(s), {how}"
        )
        return {**table, "seconds": round(seconds, 1), "threads": torch.get_num_threads()}

    table, reused = cached_table("mixed-sensitivity", sensitivity_key(qkey, options), ctx, compute)
    ctx.reporter.log(f"  sensitivity table {'reused from the cache' if reused else 'measured'} ({len(units)} units)")
    cap = high if options.mixed.max_mb is None else int(options.mixed.max_mb * 1e6)
    choice = choose_units(table, costs, low, cap)
    by_node = {u.node: u for u in units}
    found = None
    if options.accuracy_budget is not None:  # the candidates are prefixes of the size budget's order
        choice, found = budget.fit(model, choice, by_node, dequant, judged, options, (low, costs), ctx)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for node in choice.eight:
            for m in by_node[node].modules:
                qws[m] = eight[m]
                modules[m].weight.copy_(dequant[m].to(modules[m].weight.dtype))  # the parity check's torch side
    ctx.reporter.log(
        f"  mixed: {len(choice.eight)} of {len(units)} units at 8 bits, "
        f"predicted {choice.predicted_bytes / 1e6:.2f} MB "
        f"(size cap {'none' if options.mixed.max_mb is None else f'{options.mixed.max_mb:g}'}, "
        f"all 4-bit {low / 1e6:.2f})"
    )
    info = {**_scheme_info(options, qws, None), "quantize_seconds": round(time.perf_counter() - start, 1)}
    if unscaled:
        info["awq_groups_unscaled"] = unscaled
    head_bits = qws[head_name].bits
    info["lm_head"] = f"int{head_bits}"
    info["mixed"] = {
        "max_mb": options.mixed.max_mb,
        "windows": options.mixed.windows,
        "window_slice": [getattr(options.method, "samples", 0), getattr(options.method, "samples", 0) + len(batches)],
        "group_size_8bit": g8,
        "kl_4bit": table["kl_4bit"],
        "all_4bit_bytes": low,
        "all_8bit_bytes": high,
        "predicted_bytes": choice.predicted_bytes,
        "eight_bit": list(choice.eight),
        "units": choice.rows,
        "sensitivity_reused": reused,
        "quantized_reused": quantized_reused,
    }
    if found is not None:
        info["accuracy_budget"] = found
    out = build_genai_artifact(model, qws, options, ctx, {**info, "layers_quantized": len(qws)}, mixed=True)
    real = (ctx.outdir / WEIGHT_FILE).stat().st_size
    if real != choice.predicted_bytes:
        raise StageError(
            f"quantize int4 mixed: {ctx.outdir / WEIGHT_FILE} has {real} bytes, "
            f"the prediction {choice.predicted_bytes}: "
            "the builder stored something compress.quant.mixed does not count; the budget cannot be trusted"
        )
    out.info["mixed"]["real_bytes"] = real
    if head_bits == 8:
        out.info["lm_head_quantizer"] = f"ours (RTN 8 bit g{g8}, chosen by mixed)"
    return out
