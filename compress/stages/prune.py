"""`prune`: structured (channel) pruning of a torch model; the narrower model is the next stage's input.

```yaml
- prune: {importance: l2, target: {macs: 0.4}, scope: uniform, round_to: 16}
- prune: {importance: taylor, target: {channels: 0.3}, samples: 128, ignored_layers: ["features.0.*"]}
```
The work is done by `compress.prune.prune_vision` (torch-pruning's dependency graph, Fang et al. 2023,
arXiv 2301.12900); this file wires it to the pipeline: the adapter's model, example input and
calibration batches in, the adapter's checkpoint format out. Pruning alone costs accuracy; follow it with
`distill` (or `finetune`) to recover it. Keep `round_to` at 16 or more when the model is then quantized
for ONNX Runtime: with widths that are multiples of 8 only, its INT8 kernels ran a 42%-fewer-MACs
MobileNetV2 no faster than the unpruned one (see pipelines/mobilenetv2-fashion-full.yaml).

Families: vision. Llama-style decoders (`compress.prune.prune_llama`) will join with the causal-lm
adapter; until then a causal-lm pipeline with a `prune` stage is a config error.
"""

from __future__ import annotations

import json
import time
from typing import ClassVar

from pydantic import Field, field_validator

from compress.errors import ConfigError
from compress.prune.options import VISION_IMPORTANCES, PruneOptions
from compress.registry import register_stage
from compress.stages.base import StageContext, StageOptions, StageOutput

LAYERS_FILE = "_prune_layers.json"  # per-layer widths; "_" files are side files, not counted in the size


class PruneStageOptions(StageOptions, PruneOptions):
    """Remove whole channels to a MACs or channel target (the fields of `compress.prune.PruneOptions`).

    ```yaml
    - prune: {importance: l2, target: {macs: 0.4}, steps: 20, scope: uniform, round_to: 8}
    ```
    """

    families: ClassVar[frozenset[str]] = frozenset({"vision"})
    samples: int = Field(
        128, gt=0, description="taylor importance: labelled calibration samples whose gradients rank channels"
    )
    batch_size: int = Field(32, gt=0, description="taylor importance: batch size of the gradient passes")

    @field_validator("target", mode="wrap")
    @classmethod
    def _target_error_as_value_error(cls, value, handler):  # noqa: ANN001, ANN206 - pydantic wrap validator
        # PruneTarget raises ConfigError, which pydantic would let escape without the file:line of the key.
        try:
            return handler(value)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("prune.target: ")) from None

    @field_validator("importance")
    @classmethod
    def _vision_importance(cls, value: str) -> str:
        if value not in VISION_IMPORTANCES:
            raise ValueError(
                f"'{value}' is for causal-lm models, which this stage does not prune yet; "
                f"allowed: {', '.join(VISION_IMPORTANCES)}"
            )
        return value

    @field_validator("mlp_ratio", "heads_ratio")
    @classmethod
    def _causal_lm_only(cls, value: float) -> float:
        if value:
            raise ValueError("applies to causal-lm models, which this stage does not prune yet; use target")
        return value

    def library_options(self) -> PruneOptions:
        """The options of `compress.prune`, without the stage's own keys."""
        return PruneOptions.model_validate(self.model_dump(include=set(PruneOptions.model_fields)))

    def cache_fields(self) -> dict:
        fields = super().cache_fields()
        if self.importance != "taylor":  # only taylor reads calibration data
            fields.pop("samples")
            fields.pop("batch_size")
        return fields


@register_stage("prune", options=PruneStageOptions)
def prune(artifact, options: PruneStageOptions, ctx: StageContext) -> StageOutput:
    """Structured channel pruning with torch-pruning to a MACs or channel target."""
    import torch

    from compress.prune import prune_vision

    adapter = ctx.adapter
    if adapter.family != "vision":
        raise ConfigError(f"prune: family '{adapter.family}' is not supported yet; allowed: vision")
    torch.manual_seed(ctx.seed)
    torch.set_num_threads(ctx.threads)
    model = adapter.load_torch(artifact)
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
    start = time.perf_counter()
    with ctx.reporter.task(f"prune {target} ({lib.importance}, {lib.scope})", total=steps) as task:

        def progress(step: int, total: int, reduction: float) -> None:
            task.advance(1, info=f"step {step}/{total}: MACs -{reduction:.1%}")

        report = prune_vision(model, example_inputs, lib, calib_batches=calib, progress=progress)
    seconds = time.perf_counter() - start
    model.eval()
    file = adapter.save_torch(model, ctx.outdir)

    layers = [{"name": lc.name, "before": lc.before, "after": lc.after} for lc in report.layers]
    (ctx.outdir / LAYERS_FILE).write_text(json.dumps(layers, indent=1) + "\n")
    changed = [lc for lc in report.layers if lc.after != lc.before]
    kept = min((lc.after / lc.before for lc in changed), default=1.0)
    info = {
        "importance": lib.importance,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "params_reduction": round(report.params_reduction, 4),
        "macs_before": report.macs_before,
        "macs_after": report.macs_after,
        "macs_reduction": round(report.macs_reduction, 4),
        "prune_steps": report.steps,
        "layers_pruned": f"{len(changed)}/{len(report.layers)}",
        "min_layer_kept": round(kept, 3),
        "prune_seconds": round(seconds, 1),
    }
    ctx.reporter.log(
        f"  MACs {report.macs_before / 1e6:.1f}M -> {report.macs_after / 1e6:.1f}M "
        f"(-{report.macs_reduction:.1%}), params {report.params_before / 1e6:.2f}M -> "
        f"{report.params_after / 1e6:.2f}M in {report.steps} step(s); per-layer widths in {LAYERS_FILE}"
    )
    return StageOutput(file=file, format="torch", precision=artifact.precision, info=info)
