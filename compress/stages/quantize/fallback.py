"""Sensitivity analysis and the accuracy-budget fallback of static (Q/DQ) INT8.

```yaml
- quantize: {precision: int8, method: {name: static, calibrator: percentile, samples: 512},
             sensitivity: {samples: 1024},
             accuracy_budget: {max_drop: 0.15, max_fallback: 10, samples: 8000, start: 12000, sigmas: 0}}
```

Two slices of `data.calibration`, both held apart from the samples the ranges come from and never from the
evaluation set: the probes that rank the nodes run on samples [method.samples, method.samples +
sensitivity.samples) (relative output errors: a few hundred samples resolve them), and the candidates are
accepted or refused on `accuracy_budget.samples` samples from `start` (default: right after the probes'),
because a top-1 budget needs resolution: on 1,024 samples one sample is 0.098 points, a 0.15-point budget
one or two of them, and such a slice did not predict the test set (README, MobileNetV2 with an accuracy
budget). The data must hold them (the stage says so otherwise). The runner evaluates the chosen file on the
evaluation set like any other artifact and the `accuracy_budget` gate bounds that result. Where
`data.calibration` and `data.train` draw from one split they share their first samples (a pipeline's
`start` can skip past the fine-tune's): a slice the model was trained on is easier than unseen data.

Sensitivity of a node, from the relative output error (RMS of INT8 minus float outputs over RMS of the float
outputs, on the slice): `gain` = what leaving only that node float wins back in the full INT8 graph (what a
fallback buys in the graph that ships: a node's error depends on the quantized inputs it receives), plus
`alone` = the error with only that node quantized among the candidates. Both, because either alone misses
a case: with two independent bottlenecks, floating one of them wins back nothing while the other still
ruins the output (tests/stages/test_int8_budget.py builds that net), and a node harmless alone can be the
one whose error the rest compound. Score = gain + alone ranks the nodes (two graphs per node). Top-1
agreement with the float graph is recorded beside it; it does not rank: it moves in steps of one image
and is flat for most single nodes on a slice of a few hundred.

The fallback returns nodes to float in that order, one at a time, full INT8 (none float) being the first
candidate, until the primary metric's drop vs the float graph on the acceptance slice is within `max_drop`
(`Adapter.evaluate_calibration`), or `max_fallback` nodes are float; then the best candidate seen (smallest
drop, fewest float nodes on ties) is the artifact, and its info names the nodes still quantized that were
ranked next (what blocked the budget). Each step records the drop's paired standard error: per sample,
d = (float right) - (candidate right), se = sd(d) / sqrt(n), which only the samples where the two graphs
differ feed; `sigmas: k` accepts a candidate only if drop + k * se <= max_drop (0, the default, decides on
the estimate and reports the error beside it). Each graph is written from the same calibration ranges
(`QdqRecipe`), so a probe costs one `quantize_static` without calibration.

With `bias_correction: true` the stage corrects the full INT8 graph first and the recipe carries its per-layer
shifts (`QdqRecipe.bias_shifts`): every probe and candidate gets them on the layers it still quantizes (same
ranges, so the same INT32 codes), and a node left float keeps its float bias. A shift was measured with every
earlier layer quantized, so with some of them float it is an approximation; measuring each graph's own
corrections would cost one pass per layer per probe.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from compress.errors import StageError
from compress.quant.calibration import QdqRecipe, quantizable_nodes
from compress.schema import PositiveCount, Real
from compress.stages.quantize.common import BudgetOptions

if TYPE_CHECKING:
    from compress.families.base import Evaluation
    from compress.stages.base import StageContext


class SensitivityOptions(BaseModel):
    """`sensitivity: {samples: N}`: per-node sensitivity on N held-apart calibration samples."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: PositiveCount = Field(
        256, description="calibration samples after the method's `samples`, held apart from the ranges' samples"
    )


class AccuracyBudget(BudgetOptions):
    """`accuracy_budget: {max_drop: 0.15, max_fallback: 10, samples: 4096}` in the family's primary metric unit."""

    max_drop: Real = Field(ge=0, description="largest drop of the primary metric vs the float input (its unit)")
    max_fallback: PositiveCount = Field(10, description="most nodes returned to float before giving up")
    samples: PositiveCount = Field(
        4096, description="held-apart calibration samples each candidate is accepted or refused on (never evaluation)"
    )

    @property
    def limit(self) -> float:
        return self.max_drop

    def gate_detail(self, found: Mapping[str, Any]) -> str:
        kept = len(found.get("float_nodes", ()))
        detail = (
            f"calibration slice ({found.get('samples', '?')} samples): drop {found.get('drop', float('nan')):.3f} "
            f"± {found.get('se', float('nan')):.3f} with {kept} node(s) float"
        )
        if not found.get("met", False):
            blocked = ", ".join(n["node"] for n in found.get("blocked_by", ()))
            detail += f"; budget not met within max_fallback {self.max_fallback} (next: {blocked})"
        return detail


_BATCH = 32
_BLOCKERS = 5  # nodes named as what blocked an unmet budget


def slice_inputs(ctx: StageContext, skip: int, samples: int) -> list[dict[str, np.ndarray]]:
    """Calibration inputs [skip, skip + samples), in batches of `_BATCH`; refused if the data holds fewer."""
    items = list(islice(ctx.adapter.calibration_inputs(skip + samples, batch_size=1), skip, None))
    if len(items) < samples:
        raise StageError(
            f"quantize int8: sensitivity needs {skip + samples} calibration samples (method.samples {skip} for the "
            f"ranges + sensitivity.samples {samples} held apart), data.calibration holds {skip + len(items)}; "
            f"raise data.calibration.samples or lower sensitivity.samples"
        )
    names = list(items[0])
    return [
        {k: np.concatenate([it[k] for it in items[i : i + _BATCH]]) for k in names}
        for i in range(0, len(items), _BATCH)
    ]


def _outputs(path: Path, batches: list[dict[str, np.ndarray]], threads: int, config: dict[str, str]) -> np.ndarray:
    """The first output of `path` on every batch, (N, ...)."""
    from compress.backends.onnxruntime_backend import OrtSession

    session = OrtSession(path, threads=threads, session_config=config)
    return np.concatenate([session.run(b)[0] for b in batches])


def output_error(ours: np.ndarray, float_out: np.ndarray) -> float:
    """Relative RMS error (%) of `ours` against the float graph's outputs."""
    return float(100.0 * np.linalg.norm(ours - float_out) / max(np.linalg.norm(float_out), 1e-30))


def agreement(ours: np.ndarray, float_out: np.ndarray) -> float:
    """Share (%) of samples whose top-1 of the first output is the float graph's."""
    return float(100.0 * (ours.reshape(len(ours), -1).argmax(1) == float_out.reshape(len(ours), -1).argmax(1)).mean())


def sensitivities(
    recipe: QdqRecipe, work: Path, batches: list[dict[str, np.ndarray]], ctx: StageContext, config: dict[str, str]
) -> dict[str, Any]:
    """Per quantized node: output error and agreement with only that node float, sorted most sensitive first."""
    reference = _outputs(recipe.model, batches, ctx.threads, {})
    full = _outputs(recipe.write(work / "full.onnx"), batches, ctx.threads, config)
    full_error, full_agree = output_error(full, reference), agreement(full, reference)
    import onnx

    ops = {n.name: n.op_type for n in onnx.load(str(recipe.model), load_external_data=False).graph.node}
    rows = []
    nodes = quantizable_nodes(recipe)
    with ctx.reporter.task("sensitivity (one node float at a time)", total=len(nodes)) as task:
        for node in nodes:
            probe = _outputs(recipe.write(work / "probe.onnx", [node]), batches, ctx.threads, config)
            others = [n for n in nodes if n != node]
            alone = output_error(
                _outputs(recipe.write(work / "probe.onnx", others), batches, ctx.threads, config), reference
            )
            error = output_error(probe, reference)
            rows.append(
                {
                    "node": node,
                    "op_type": ops[node],
                    "error_pct": round(error, 4),  # only this node float
                    "gain_pct": round(full_error - error, 4),  # output error won back by leaving it float
                    "alone_pct": round(alone, 4),  # only this node (of the candidates) quantized
                    "score": round(full_error - error + alone, 4),
                    "agreement_pct": round(agreement(probe, reference), 3),
                }
            )
            task.advance(1)
    (work / "probe.onnx").unlink(missing_ok=True)
    rows.sort(key=lambda r: (-r["score"], r["node"]))
    return {
        "samples": sum(len(next(iter(b.values()))) for b in batches),
        "measure": "relative RMS output error (%) vs the float graph with only this node float (gain: what that "
        "wins back) and with only this node quantized (alone); score = gain + alone",
        "full_int8": {"error_pct": round(full_error, 4), "agreement_pct": round(full_agree, 3)},
        "nodes": rows,
    }


def acceptance_span(budget: AccuracyBudget, probes: tuple[int, int]) -> tuple[int, int]:
    """Calibration samples [start, stop) the candidates are judged on (`Int8Options.check_family` refused a
    `start` inside the ranges' or the probes' samples)."""
    start = probes[1] if budget.start is None else budget.start
    return start, start + budget.samples


def overlap_problem(budget: AccuracyBudget, method_samples: int, sensitivity: SensitivityOptions) -> str | None:
    """Why `budget.start` may not be used: it falls inside the ranges' or the probes' samples."""
    end = method_samples + sensitivity.samples
    if budget.start is None or budget.start >= end:
        return None
    return (
        f"start {budget.start} overlaps the calibration samples [0, {end}) the ranges (method.samples "
        f"{method_samples}) and the sensitivity probes (sensitivity.samples {sensitivity.samples}) use; "
        f"set start >= {end} or remove it"
    )


@dataclass(frozen=True)
class AcceptanceSlice:
    """The budget, the calibration samples [start, stop) its candidates are judged on, and the float graph's
    result there."""

    budget: AccuracyBudget
    span: tuple[int, int]
    ctx: StageContext
    reference: Evaluation

    @classmethod
    def measure(
        cls, ctx: StageContext, budget: AccuracyBudget, probes: tuple[int, int], float_model: Path
    ) -> AcceptanceSlice:
        span = acceptance_span(budget, probes)
        return cls(budget, span, ctx, _evaluate(ctx, span, float_model, {}))

    def evaluate(self, path: Path, session_config: dict[str, str]) -> Evaluation:
        return _evaluate(self.ctx, self.span, path, session_config)


def _evaluate(ctx: StageContext, span: tuple[int, int], path: Path, session_config: dict[str, str]) -> Evaluation:
    from compress.backends.onnxruntime_backend import OrtSession

    session = OrtSession(path, threads=ctx.threads, session_config=session_config)
    try:
        return ctx.adapter.evaluate_calibration(session, span[0], span[1], ctx.reporter)
    except IndexError as exc:  # the slice runs past the data (Adapter.evaluate_calibration)
        raise StageError(
            f"quantize int8: accuracy_budget judges candidates on calibration samples [{span[0]}, {span[1]}) "
            f"(start + samples): {exc}; raise data.calibration.samples or lower accuracy_budget.samples"
        ) from None


def paired_drop(result: Evaluation, reference: Evaluation, drop: float) -> dict[str, Any]:
    """`drop` with its paired standard error: per sample d = float right - candidate right (-1, 0, 1), so the
    error is sd(d) / sqrt(n), far below an unpaired one (only the samples where the two differ count)."""
    labels = reference.samples["labels"]
    d = (reference.predictions == labels).astype(np.float64) - (result.predictions == labels)
    se = 100.0 * float(d.std(ddof=1)) / len(d) ** 0.5 if len(d) > 1 else 0.0
    return {"drop": round(drop, 4), "se": round(se, 4), "lost": int((d > 0).sum()), "won": int((d < 0).sum())}


def fall_back(
    recipe: QdqRecipe,
    out: Path,
    ranked: list[dict[str, Any]],
    judge: AcceptanceSlice,
    ctx: StageContext,
    config: dict[str, str],
) -> dict[str, Any]:
    """Greedy fallback (module docstring) judged on `judge`: writes the chosen graph at `out`, returns what was
    tried and kept. Full INT8 is the first candidate."""
    budget, span, reference = judge.budget, judge.span, judge.reference
    quality = ctx.adapter.quality
    steps: list[dict[str, Any]] = []
    best: tuple[float, int] | None = None
    order = [r["node"] for r in ranked]
    for k in range(min(budget.max_fallback, len(order)) + 1):
        float_nodes = order[:k]
        candidate = recipe.write(out.with_name(f"candidate-{k}.onnx"), float_nodes)
        result = judge.evaluate(candidate, config)
        paired = paired_drop(result, reference, float(ctx.adapter.compare(result, reference)[quality.drop_key]))
        bound = paired["drop"] + budget.sigmas * paired["se"]  # what the decision compares with max_drop
        steps.append(
            {
                "float_nodes": k,
                "added": float_nodes[-1] if float_nodes else None,
                quality.name: round(float(result.metrics[quality.name]), 4),
                **paired,
                "bound": round(bound, 4),
            }
        )
        ctx.reporter.log(
            f"  fallback {k} node(s) float: {quality.name} drop {paired['drop']:.3f} ± {paired['se']:.3f} "
            f"{quality.unit} on the slice ({paired['lost']} lost, {paired['won']} won)"
        )
        if best is None or bound < best[0]:
            if best is not None:
                out.with_name(f"candidate-{best[1]}.onnx").unlink()
            best = (bound, k)
        else:
            candidate.unlink()
        if bound <= budget.max_drop:
            break
    assert best is not None  # k = 0 always runs
    bound, k = best
    out.with_name(f"candidate-{k}.onnx").replace(out)
    met = bound <= budget.max_drop
    by_node = {r["node"]: r for r in ranked}
    chosen = steps[k]
    return {
        "max_drop": budget.max_drop,
        "max_fallback": budget.max_fallback,
        "sigmas": budget.sigmas,
        "metric": quality.name,
        "unit": quality.unit,
        "slice": list(span),
        "samples": len(reference.predictions),
        "slice_reference": round(float(reference.metrics[quality.name]), 4),
        "met": met,
        "drop": chosen["drop"],
        "se": chosen["se"],
        "bound": chosen["bound"],
        "float_nodes": [by_node[n] for n in order[:k]],
        "steps": steps,
        "blocked_by": [] if met else [by_node[n] for n in order[k : k + _BLOCKERS]],
    }


def budget_search(
    recipe: QdqRecipe,
    out: Path,
    sensitivity: SensitivityOptions,
    budget: AccuracyBudget | None,
    calibration_samples: int,
    ctx: StageContext,
    config: dict[str, str],
) -> dict[str, Any]:
    """Sensitivity (always) and, with a budget, the fallback; writes the artifact's graph at `out`."""
    if recipe.large:  # each probe would write gigabytes of external data; not built for that yet
        raise StageError(
            "quantize int8: sensitivity / accuracy_budget handle graphs in one file (< 1.8 GB) only; remove them"
        )
    span = (calibration_samples, calibration_samples + sensitivity.samples)
    # the float graph on the acceptance slice first: a slice past the data fails before any probe
    judge = None if budget is None else AcceptanceSlice.measure(ctx, budget, span, recipe.model)
    work = out.parent / "_probe"
    work.mkdir()
    batches = slice_inputs(ctx, *span[:1], sensitivity.samples)
    report = sensitivities(recipe, work, batches, ctx, config)
    report["slice"] = list(span)
    info: dict[str, Any] = {"sensitivity": report}
    if judge is None:
        (work / "full.onnx").replace(out)
    else:
        info["accuracy_budget"] = fall_back(recipe, out, report["nodes"], judge, ctx, config)
    for leftover in _files(work):
        leftover.unlink()
    work.rmdir()
    return info


def _files(folder: Path) -> Iterator[Path]:
    return (p for p in folder.iterdir() if p.is_file())
