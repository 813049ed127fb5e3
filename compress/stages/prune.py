"""`prune`: structured pruning of a torch model; the narrower model is the next stage's input.

```yaml
# a CNN: channels, to a MACs or channel target
- prune: {importance: l2, target: {macs: 0.4}, scope: uniform, round_to: 16}
- prune: {importance: taylor, target: {channels: 0.3}, samples: 128, ignored_layers: ["features.0.*"]}
# a decoder LLM: MLP width and attention heads, the same in every layer
- prune: {importance: wanda, mlp_ratio: 0.3, heads_ratio: 0.34, round_to: 64, samples: 16}
```
The model's family prunes (`Adapter.prune`): CNNs through `compress.prune.prune_vision` (torch-pruning's
dependency graph, Fang et al. 2023, arXiv 2301.12900), decoders through `compress.prune.prune_decoder`
(grouped-query-attention aware, over the architecture map). This file loads, times and saves; the family's
`prune_support` says which options apply. Pruning alone costs accuracy; follow it with `distill` (or
`finetune`) to recover it. Keep `round_to` at 16 or more when the model is then quantized for ONNX
Runtime: with widths that are multiples of 8 only, its INT8 kernels ran a 42%-fewer-MACs MobileNetV2 no
faster than the unpruned one (see pipelines/mobilenetv2-fashion-full.yaml).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from compress.errors import ConfigError
from compress.prune.options import PruneOptions
from compress.registry import register_stage
from compress.schema import Count
from compress.stages.base import StageContext, StageOptions, StageOutput

if TYPE_CHECKING:
    from compress.families.base import Adapter


class PruneStageOptions(StageOptions, PruneOptions):
    """Remove whole channels or heads (the fields of `compress.prune.PruneOptions`).

    ```yaml
    - prune: {importance: l2, target: {macs: 0.4}, steps: 20, scope: uniform, round_to: 8}  # CNN
    - prune: {importance: wanda, mlp_ratio: 0.3, heads_ratio: 0.34, round_to: 64}           # decoder
    ```
    Which keys apply depends on the model family; `check_family` reports the others with file and line.
    """

    samples: Count = Field(
        128,
        gt=0,
        description="taylor: labelled calibration images whose gradients rank channels; "
        "wanda: calibration windows whose activations weigh the weights (at most data's count)",
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

    def check_family(self, adapter: type[Adapter]) -> list[tuple[str, str]]:
        from compress.registry import registered_adapters

        adapters, family = registered_adapters(), adapter.family
        support = adapter.prune_support
        if support is None:
            return [("importance", f"the {family} family cannot be pruned")]
        problems = []
        if self.importance not in support.importances:
            problems.append(("importance", f"does not fit {family} models; allowed: {', '.join(support.importances)}"))
        for key in sorted(self.model_fields_set & set(PruneOptions.model_fields) - support.keys):
            others = [f for f, a in adapters.items() if a.prune_support and key in a.prune_support.keys]
            problems.append(
                (
                    key,
                    f"applies to {' / '.join(others) or 'no'} models; {family} takes {', '.join(sorted(support.keys))}",
                )
            )
        if support.needs_one_of and not any(getattr(self, k) for k in support.needs_one_of):
            names = " and/or ".join(support.needs_one_of)
            problems.append((support.needs_one_of[0], f"set {names} above 0 ({family} pruning needs one of them)"))
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
    """Structured pruning: channels of a CNN, MLP width and attention heads of a decoder."""
    import torch

    torch.manual_seed(ctx.seed)
    torch.set_num_threads(ctx.threads)
    model = ctx.adapter.load_torch(artifact)
    start = time.perf_counter()
    info = ctx.adapter.prune(
        model, options.library_options(), samples=options.samples, batch_size=options.batch_size, outdir=ctx.outdir
    )
    info["prune_seconds"] = round(time.perf_counter() - start, 1)
    model.eval()
    file = ctx.adapter.save_torch(model, ctx.outdir)
    return StageOutput(file=file, format="torch", precision=artifact.precision, info=info)
