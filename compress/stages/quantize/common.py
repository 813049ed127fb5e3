"""What every quantize scheme checks: the input is still float, and the output holds quantized nodes.

A quantizer that finds nothing it can quantize writes the graph back unchanged; labelled "int8", that file
would be evaluated, gated and shipped as a quantized model. Counting the quantized nodes after the fact
turns that into a stage failure with the reason, and the count goes into the artifact's info.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from compress.errors import StageError
from compress.quant import targets
from compress.quant.registry import named, owner_of
from compress.quant.vocab import FLOAT_PRECISIONS
from compress.schema import Count, PositiveCount, Real

#: `target:` of either precision: a name or `{name: ..., <its keys>}`
TargetField = Annotated[
    targets.OnnxruntimeCpu | targets.TensorRT | targets.OnnxruntimeGenai,
    Field(discriminator="name"),
    BeforeValidator(named(targets.TARGET_OPTIONS, "target")),
]


class BudgetOptions(BaseModel):
    """`accuracy_budget:` of a quantize stage (static INT8's `fallback.AccuracyBudget`, mixed INT4's
    `mixed_budget.MixedBudget`): what the `accuracy_budget` gate (compress/metrics/gates.py) reads of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: Count | None = Field(
        None,
        description="first calibration sample (window) of the acceptance slice (default: right after the "
        "sensitivity's); it must not overlap the method's or the sensitivity's",
    )
    sigmas: Real = Field(
        0.0, ge=0, description="accept only if the estimate + sigmas x its paired standard error fits (0: the estimate)"
    )

    @property
    def limit(self) -> float:
        """The bound the gate puts on the evaluation set's drop or rise (the family's quality unit)."""
        raise NotImplementedError

    def gate_detail(self, found: Mapping[str, Any]) -> str:
        """The gate's detail from the stage's `info["accuracy_budget"]`."""
        raise NotImplementedError


class RiseBudget(BudgetOptions):
    """A decoder's budget: the perplexity rise (%) vs the float input on held-apart calibration windows (mixed
    INT4's `MixedBudget`, weight-only INT8's `PerplexityBudget`)."""

    max_rise: Real = Field(ge=0, description="largest perplexity rise (%) vs the float input on the held-apart windows")
    windows: PositiveCount = Field(4, description="calibration windows each candidate is accepted or refused on")

    @property
    def limit(self) -> float:
        return self.max_rise

    def sigmas_problems(self) -> list[tuple[str, str]]:
        """`sigmas` asks for a standard error over windows, which one window has not."""
        if self.sigmas and self.windows < 2:
            return [
                (
                    "accuracy_budget",
                    "sigmas: one window has no standard error over windows; raise windows or remove sigmas",
                )
            ]
        return []


def cached_table(kind: str, key: str, ctx: Any, compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """A sensitivity table from the adapter's cache (`<cache>/<kind>/<key>.json`, used only when the key stored
    inside matches), else computed and stored; (table, reused). JSON: nothing in the cache is unpickled."""
    import json

    from compress.atomic import write_json_atomic

    path = ctx.adapter.cache_dir / kind / f"{key[:32]}.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = None
        if isinstance(data, dict) and data.get("key") == key:
            return data["table"], True
    table = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"key": key, "table": table})
    return table, False


def refuse_flat_keys(data: Any, own: Mapping[str, Any], methods: Mapping[str, type]) -> Any:
    """A model_validator(mode="before"): an algorithm's or a target's key written at the top is refused
    with its new place (one way to write each option, no alias)."""
    if not isinstance(data, Mapping):
        return data
    for key in data:
        where = None if key in own else owner_of(key, {"method": methods, "target": targets.TARGET_OPTIONS})
        if where:
            kind, name = where.split(" ", 1)
            raise ValueError(f"'{key}' is a key of {where}: write {kind}: {{name: {name}, {key}: ...}}")
    return data


#: ONNX ops that compute on, or produce, quantized tensors
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulNBits",
        "MatMulInteger",
        "ConvInteger",
        "GatherBlockQuantized",
    }
)


def input_problem(name: str, precision: str, scheme: str) -> str | None:
    """Why `scheme` cannot start from artifact `name` of `precision` (None when it can)."""
    if precision in FLOAT_PRECISIONS:
        return None
    return (
        f"'{name}' is already {precision}; {scheme} starts from a float (fp32/fp16) artifact: "
        "set `input:` to one (e.g. the export it came from)"
    )


def refuse_quantized_input(artifact, scheme: str) -> None:
    """Raise StageError when `artifact` is already quantized (the run-time twin of the validate check)."""
    problem = input_problem(artifact.name, artifact.precision, scheme)
    if problem:
        raise StageError(problem)


def op_counts(path: Path) -> Counter[str]:
    """Node count by op type of the ONNX graph at `path` (external data not loaded)."""
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def quantized_nodes(counts: Counter[str]) -> dict[str, int]:
    """The quantized ops among `counts` (QLinear* included), by op type."""
    return {op: n for op, n in sorted(counts.items()) if op in QUANTIZED_OPS or op.startswith("QLinear")}


def require_quantized(out: Path, src: Path, scheme: str, hint: str) -> dict[str, int]:
    """Quantized nodes the stage added (graph `out` against its input `src`), by op type; StageError when
    there is none, naming what the input had and `hint` (what to do instead)."""
    before, after = op_counts(src), op_counts(out)
    added = {op: n - before.get(op, 0) for op, n in quantized_nodes(after).items() if n > before.get(op, 0)}
    if not added:
        has = ", ".join(f"{before.get(op, 0)} {op}" for op in ("Conv", "Gemm", "MatMul"))
        raise StageError(f"{scheme}: no node was quantized (the model has {has} nodes); {hint}")
    return added


def torch_calibration(ctx: Any, samples: int, scheme: str) -> list[Any]:
    """The adapter's calibration inputs as torch (a StageContext's): keyword batches for multi-input models,
    positional for one input; StageError naming `scheme` when there is none."""
    import numpy as np
    import torch

    names = list(ctx.adapter.io_spec().inputs)
    batches = []
    for batch in ctx.adapter.calibration_inputs(samples, batch_size=ctx.adapter.calibration_batch_size):
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
        batches.append((tensors[names[0]],) if len(names) == 1 else tensors)
    if not batches:
        raise StageError(f"{scheme}: the adapter produced no calibration inputs")
    return batches
