"""`prune`: structured pruning of a torch model; the narrower model is the next stage's input.

```yaml
# vision: channels, to a MACs or channel target
- prune: {importance: l2, target: {macs: 0.4}, scope: uniform, round_to: 16}
- prune: {importance: taylor, target: {channels: 0.3}, samples: 128, ignored_layers: ["features.0.*"]}
# causal-lm (Llama-style): MLP width and attention heads, the same in every layer
- prune: {importance: wanda, mlp_ratio: 0.3, heads_ratio: 0.34, round_to: 64, samples: 16}
```
Vision is done by `compress.prune.prune_vision` (torch-pruning's dependency graph, Fang et al. 2023,
arXiv 2301.12900); Llama-style decoders by `compress.prune.prune_llama` (grouped-query-attention aware,
our own: see its docstring). This file wires them to the pipeline: the adapter's model, example input and
calibration data in, the adapter's checkpoint format out. Pruning alone costs accuracy; follow it with
`distill` (or `finetune`) to recover it. Keep `round_to` at 16 or more when the model is then quantized
for ONNX Runtime: with widths that are multiples of 8 only, its INT8 kernels ran a 42%-fewer-MACs
MobileNetV2 no faster than the unpruned one (see pipelines/mobilenetv2-fashion-full.yaml).
"""

from __future__ import annotations

import json
import time

from pydantic import Field, field_validator

from compress.errors import ConfigError
from compress.prune.options import LLM_IMPORTANCES, VISION_IMPORTANCES, PruneOptions
from compress.registry import register_stage
from compress.schema import Count
from compress.stages.base import StageContext, StageOptions, StageOutput

LAYERS_FILE = "_prune_layers.json"  # per-layer widths; "_" files are side files, not counted in the size


class PruneStageOptions(StageOptions, PruneOptions):
    """Remove whole channels or heads (the fields of `compress.prune.PruneOptions`).

    ```yaml
    - prune: {importance: l2, target: {macs: 0.4}, steps: 20, scope: uniform, round_to: 8}  # vision
    - prune: {importance: wanda, mlp_ratio: 0.3, heads_ratio: 0.34, round_to: 64}           # causal-lm
    ```
    Which keys apply depends on the model family; `check_family` reports the others with file and line.
    """

    samples: Count = Field(
        128,
        gt=0,
        description="taylor (vision): labelled calibration images whose gradients rank channels; "
        "wanda (causal-lm): calibration windows whose activations weigh the weights (at most data's count)",
    )
    batch_size: Count = Field(32, gt=0, description="taylor importance: batch size of the gradient passes")

    @field_validator("target", mode="wrap")
    @classmethod
    def _target_error_as_value_error(cls, value, handler):  # noqa: ANN001, ANN206 - pydantic wrap validator
        # PruneTarget raises ConfigError, which pydantic would let escape without the file:line of the key.
        try:
            return handler(value)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("prune.target: ")) from None

    def check_family(self, family: str) -> list[tuple[str, str]]:
        if family == "vision":
            problems = [
                (k, "applies to causal-lm models; for vision use target")
                for k in ("mlp_ratio", "heads_ratio")
                if getattr(self, k)
            ]
            if self.importance not in VISION_IMPORTANCES:
                problems.append(("importance", f"is for causal-lm models; allowed: {', '.join(VISION_IMPORTANCES)}"))
            return problems
        problems = []
        if self.importance not in LLM_IMPORTANCES:
            problems.append(("importance", f"is for vision models; allowed: {', '.join(LLM_IMPORTANCES)}"))
        if not (self.mlp_ratio or self.heads_ratio):
            problems.append(
                (
                    "mlp_ratio",
                    "set mlp_ratio and/or heads_ratio above 0 (causal-lm pruning removes MLP "
                    "channels and attention heads)",
                )
            )
        for key in ("target", "steps", "scope", "max_layer_ratio", "ignored_layers"):
            if key in self.model_fields_set:
                problems.append((key, "applies to vision models; for causal-lm use mlp_ratio / heads_ratio"))
        return problems

    def library_options(self) -> PruneOptions:
        """The options of `compress.prune`, without the stage's own keys."""
        return PruneOptions.model_validate(self.model_dump(include=set(PruneOptions.model_fields)))

    def cache_fields(self) -> dict:
        fields = super().cache_fields()
        if self.importance not in ("taylor", "wanda"):  # only these read calibration data
            fields.pop("samples")
        if self.importance != "taylor":  # only taylor runs batched gradient passes
            fields.pop("batch_size")
        return fields


@register_stage("prune", options=PruneStageOptions)
def prune(artifact, options: PruneStageOptions, ctx: StageContext) -> StageOutput:
    """Structured pruning: channels of a vision model (torch-pruning), MLP width and heads of a decoder."""
    import torch

    torch.manual_seed(ctx.seed)
    torch.set_num_threads(ctx.threads)
    model = ctx.adapter.load_torch(artifact)
    start = time.perf_counter()
    if ctx.adapter.family == "causal-lm":
        info = _prune_causal_lm(model, options, ctx)
    else:
        info = _prune_vision(model, options, ctx)
    info["prune_seconds"] = round(time.perf_counter() - start, 1)
    model.eval()
    file = ctx.adapter.save_torch(model, ctx.outdir)
    return StageOutput(file=file, format="torch", precision=artifact.precision, info=info)


def _prune_vision(model, options: PruneStageOptions, ctx: StageContext) -> dict:  # noqa: ANN001 - nn.Module
    import torch

    from compress.prune import prune_vision

    adapter = ctx.adapter
    example = tuple(torch.from_numpy(v) for v in adapter.parity_inputs(1).values())
    example_inputs = example[0] if len(example) == 1 else example
    calib = None
    if options.importance == "taylor":
        calib = []
        for x, y in adapter.batches("calibration", options.batch_size):
            calib.append((torch.from_numpy(x), torch.from_numpy(y)))
            if sum(len(b[1]) for b in calib) >= options.samples:
                break

    lib = options.library_options()
    target = (
        f"{lib.target.macs:.0%} of MACs" if lib.target.macs is not None else f"{lib.target.channels:.0%} of channels"
    )
    steps = lib.steps if lib.target.macs is not None else 1
    with ctx.reporter.task(f"prune {target} ({lib.importance}, {lib.scope})", total=steps) as task:

        def progress(step: int, total: int, reduction: float) -> None:
            task.advance(1, info=f"step {step}/{total}: MACs -{reduction:.1%}")

        report = prune_vision(model, example_inputs, lib, calib_batches=calib, progress=progress)

    layers = [{"name": lc.name, "before": lc.before, "after": lc.after} for lc in report.layers]
    (ctx.outdir / LAYERS_FILE).write_text(json.dumps(layers, indent=1) + "\n")
    changed = [lc for lc in report.layers if lc.after != lc.before]
    kept = min((lc.after / lc.before for lc in changed), default=1.0)
    ctx.reporter.log(
        f"  MACs {report.macs_before / 1e6:.1f}M -> {report.macs_after / 1e6:.1f}M "
        f"(-{report.macs_reduction:.1%}), params {report.params_before / 1e6:.2f}M -> "
        f"{report.params_after / 1e6:.2f}M in {report.steps} step(s); per-layer widths in {LAYERS_FILE}"
    )
    return {
        "importance": lib.importance,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "params_reduction": round(report.params_reduction, 4),
        "macs_before": report.macs_before,
        "macs_after": report.macs_after,
        "macs_reduction": round(report.macs_reduction, 4),
        "prune_steps": report.steps,
        "layers_pruned": len(changed),
        "layers_total": len(report.layers),
        "min_layer_kept": round(kept, 3),
    }


def _linear_macs(model) -> int:  # noqa: ANN001 - nn.Module
    """Multiply-accumulates of a decoder's Linear layers per token (attention scores, which grow with the
    context, are left out; for a short context the Linear layers are nearly all of the work)."""
    from torch import nn

    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def _prune_causal_lm(model, options: PruneStageOptions, ctx: StageContext) -> dict:  # noqa: ANN001 - nn.Module
    import torch

    from compress.prune.llama import prune_llama

    lib = options.library_options()
    calib = None
    if lib.importance == "wanda":
        calib = [torch.from_numpy(b["input_ids"]) for b in ctx.adapter.calibration_inputs(options.samples)]
    macs_before = _linear_macs(model)
    what = ", ".join(
        f"{name} -{ratio:.0%}" for name, ratio in (("MLP", lib.mlp_ratio), ("heads", lib.heads_ratio)) if ratio
    )
    layers = len(model.model.layers)
    with ctx.reporter.task(f"prune {what} ({lib.importance})", total=layers) as task:
        report = prune_llama(model, lib, calib_batches=calib, progress=lambda done, total: task.advance(1))
    macs_after = _linear_macs(model)
    sizes = {
        "intermediate_size": report.intermediate_size,
        "num_attention_heads": report.num_attention_heads,
        "num_key_value_heads": report.num_key_value_heads,
    }
    ctx.reporter.log(
        f"  params {report.params_before / 1e6:.2f}M -> {report.params_after / 1e6:.2f}M "
        f"(-{report.params_reduction:.1%}); "
        + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sizes.items())
        + (f"; wanda on {sum(int(c.numel()) for c in calib)} calibration tokens" if calib else "")
    )
    return {
        "importance": lib.importance,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "params_reduction": round(report.params_reduction, 4),
        "macs_before": macs_before,
        "macs_after": macs_after,
        "macs_reduction": round(1 - macs_after / macs_before, 4),
        "macs_counted": "Linear layers, per token",
        **{k: [a, b] for k, (a, b) in sizes.items()},  # [before, after]
        "head_unit": lib.head_unit,
        "layers_pruned": report.layers,  # every decoder layer
        "layers_total": report.layers,
    }
