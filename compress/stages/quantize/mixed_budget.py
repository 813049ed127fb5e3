"""`accuracy_budget:` of `quantize: {precision: int4, target: onnxruntime-genai, mixed: ...}`: the fewest MB of
8-bit units that hold a perplexity budget.

```yaml
- quantize: {precision: int4, method: {name: awq, then: gptq}, group_size: 32, lm_head: int4,
             target: onnxruntime-genai, mixed: {windows: 2, group_size: 64},
             accuracy_budget: {max_rise: 5.0, windows: 4}}
```

It reuses `mixed` (compress/stages/quantize/mixed.py): the cached 4-bit weights, the per-unit KL sensitivity on
`mixed.windows` held-apart windows, the exact sizes and the builder's 8-bit units; `mixed.max_mb`, optional
here, caps the file. Candidates: all units at 4 bits first, then the units `choose_units` takes (KL gain per
MB, positive gains, within the cap) added one at a time in that order. Gain per MB rather than gain: the
budget is a quality floor and what is minimised is the file, so the cheapest KL per byte comes first (the
rank the size budget uses, one order for both). A candidate is judged in torch, the model holding the
dequantised weights the graph will hold (their logits agree to the parity the stage reports), by perplexity
on `accuracy_budget.windows` calibration windows from `start` (default: right after the sensitivity's),
held apart from the method's samples and the sensitivity's windows (refused at validation otherwise), against
the float input's perplexity there. Each candidate restarts at its new unit's decoder layer (`LayerRestart`,
refreshing the recording from there), so a step costs the layers from that one on, not a graph build. The
search stops at the first candidate whose rise (+ `sigmas` x its paired standard error over windows: per
window r = 100 (ppl_candidate / ppl_float - 1), se = sd(r) / sqrt(n)) is within `max_rise`; else the best
candidate (smallest bound, fewest units on ties) is the artifact, `met: false`, and its info names the units
ranked next (what blocked it: left out by the cap, or none left). The chosen graph is built once; the runner
evaluates it on the evaluation windows and the `accuracy_budget` gate (compress/metrics/gates.py) bounds the
rise vs the float input there. Refused at validation: no `mixed` beside it, a `start` inside the method's
samples or the sensitivity windows, `sigmas` on one window; `mixed`'s own refusals apply (onnxruntime-genai
on cpu, `lm_head: int4`, no checkpoint, not streamed), and at run a slice past `data.calibration_windows`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from compress.errors import StageError
from compress.stages.quantize.common import RiseBudget

if TYPE_CHECKING:
    import torch

    from compress.quant.mixed import Choice, Unit
    from compress.stages.base import StageContext
    from compress.stages.quantize.int4 import Int4Options
    from compress.stages.quantize.mixed import MixedOptions

_BLOCKERS = 5  # units named as what blocked an unmet budget


class MixedBudget(RiseBudget):
    """`accuracy_budget: {max_rise: 5.0, windows: 4}`: the perplexity rise (%) vs the float input it must hold;
    `start` defaults to right after `mixed.windows`."""

    def gate_detail(self, found: Mapping[str, Any]) -> str:
        detail = (
            f"calibration slice ({found.get('windows', '?')} windows): ppl rise {found.get('rise', float('nan')):.3f} "
            f"± {found.get('se', float('nan')):.3f} % with {len(found.get('eight_bit', ()))} unit(s) at 8 bits"
        )
        if not found.get("met", False):
            blocked = ", ".join(u["node"] for u in found.get("blocked_by", ())) or "none left"
            detail += f"; budget not met ({found.get('stopped', '?')}; next: {blocked})"
        return detail


def span(budget: MixedBudget, method_samples: int, mixed: MixedOptions) -> tuple[int, int]:
    """Calibration windows [start, stop) the candidates are judged on."""
    start = method_samples + mixed.windows if budget.start is None else budget.start
    return start, start + budget.windows


def refusals(options: Int4Options) -> list[tuple[str, str]]:
    """What `accuracy_budget` cannot be combined with, as (key, reason) (`mixed.refusals` covers the rest)."""
    budget, mixed = options.accuracy_budget, options.mixed
    if budget is None:
        return []
    if mixed is None:
        return [
            (
                "accuracy_budget",
                "needs mixed: {windows, group_size} beside it (the sensitivity and the 8-bit units it chooses "
                "from); add mixed: {windows: 2, group_size: 64}",
            )
        ]
    problems = []
    samples = getattr(options.method, "samples", 0)
    end = samples + mixed.windows
    if budget.start is not None and budget.start < end:
        problems.append(
            (
                "accuracy_budget",
                f"start {budget.start} overlaps the calibration windows [0, {end}) the method (method.samples "
                f"{samples}) and the sensitivity (mixed.windows {mixed.windows}) use; set start >= {end} or remove it",
            )
        )
    return problems + budget.sigmas_problems()


def window_nll(logits: Sequence[Any], batches: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Mean next-token NLL of every window (the evaluation's `token_nll`, float64); torch or numpy arrays."""
    from compress.families.causal_lm.task import token_nll

    return np.concatenate(
        [
            token_nll(np.asarray(lg), np.asarray(b["input_ids"])).mean(axis=1)
            for lg, b in zip(logits, batches, strict=True)
        ]
    )


def paired_rise(nll: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(rise %, its paired standard error %) of the perplexity over windows of equal length vs `reference`."""
    rise = 100.0 * (float(np.exp(nll.mean() - reference.mean())) - 1.0)
    per_window = 100.0 * (np.exp(nll - reference) - 1.0)
    se = float(per_window.std(ddof=1)) / len(nll) ** 0.5 if len(nll) > 1 else 0.0
    return rise, se


def search(
    model: torch.nn.Module,
    order: Sequence[Unit],
    eight: Mapping[str, torch.Tensor],
    batches: Sequence[Mapping[str, torch.Tensor]],
    reference: np.ndarray,
    budget: MixedBudget,
    sizes: tuple[int, Mapping[str, int]],
    ctx: StageContext,
) -> tuple[int, list[dict[str, Any]]]:
    """Candidates k = 0.. (the first k units of `order` at 8 bits, `eight`: module -> its dequantised 8-bit
    weight) judged on `batches` against the float input's per-window NLL `reference`; stops at the first
    within the budget. `sizes`: (the all-4-bit file's bytes, each unit's extra bytes at 8 bits). Leaves the
    model holding the best candidate's weights; returns (its k, the steps)."""
    import torch

    from compress.quant.mixed import LayerRestart, unit_layer

    modules = dict(model.named_modules())
    four = {m: modules[m].weight.detach().clone() for u in order for m in u.modules}
    runner = LayerRestart(model, batches)
    steps: list[dict[str, Any]] = []
    best: tuple[float, int] | None = None
    total = sizes[0]
    with torch.no_grad(), ctx.reporter.task("accuracy budget: candidates", total=len(order) + 1) as task:
        for k in range(len(order) + 1):
            if k == 0:
                logits = runner.base
            else:
                unit = order[k - 1]
                total += sizes[1][unit.node]
                for m in unit.modules:
                    modules[m].weight.copy_(eight[m].to(modules[m].weight.dtype))
                logits = runner.logits(unit_layer(unit) or 0, refresh=True)
            nll = window_nll(logits, batches)
            del logits
            rise, se = paired_rise(nll, reference)
            bound = rise + budget.sigmas * se
            steps.append(
                {
                    "units_8bit": k,
                    "added": order[k - 1].node if k else None,
                    "ppl": round(float(np.exp(nll.mean())), 4),
                    "rise": round(rise, 4),
                    "se": round(se, 4),
                    "bound": round(bound, 4),
                    "predicted_bytes": total,
                }
            )
            task.advance(1)
            if best is None or bound < best[0]:
                best = (bound, k)
            if bound <= budget.max_rise:
                break
        assert best is not None  # k = 0 always runs
        for unit in order[best[1] : len(steps) - 1]:  # back to the best candidate's weights
            for m in unit.modules:
                modules[m].weight.copy_(four[m])
    return best[1], steps


def budget_info(
    budget: MixedBudget,
    where: tuple[int, int],
    reference: np.ndarray,
    k: int,
    steps: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    order: Sequence[str],
    capped: bool,
) -> dict[str, Any]:
    """`info["accuracy_budget"]`: the budget, the slice, what was met (or the best candidate and what blocked it),
    the steps (each with its predicted file bytes). `rows`: every unit ranked by gain per MB (`choose_units`);
    `order`: the candidates' units; `capped`: a size cap left some positive-gain unit out of `order`."""
    chosen, met = steps[k], steps[k]["bound"] <= budget.max_rise
    kept = set(order[:k])
    left = [{**r, "fits": r["node"] in order} for r in rows if r["gain"] > 0 and r["node"] not in kept]
    blocked = [] if met else left
    stopped = "met" if met else ("size cap (mixed.max_mb)" if capped else "every unit with a gain tried")
    return {
        "metric": "ppl",
        "unit": "%",
        "max_rise": budget.max_rise,
        "sigmas": budget.sigmas,
        "windows": budget.windows,
        "slice": list(where),
        "slice_reference": round(float(np.exp(reference.mean())), 4),
        "met": met,
        "stopped": stopped,
        "rise": chosen["rise"],
        "se": chosen["se"],
        "bound": chosen["bound"],
        "eight_bit": list(order[:k]),
        "steps": steps,
        "blocked_by": blocked[:_BLOCKERS],
    }


@dataclass(frozen=True)
class Slice:
    """The calibration windows [start, stop) candidates are judged on, their batches and the float input's
    per-window NLL there."""

    span: tuple[int, int]
    batches: Sequence[Mapping[str, torch.Tensor]]
    reference: np.ndarray

    @classmethod
    def measure(cls, model: torch.nn.Module, options: Int4Options, ctx: StageContext) -> Slice:
        """The slice's windows and the float `model`'s NLL on them; StageError when the data holds too few."""
        from compress.quant.mixed import model_logits
        from compress.stages.quantize.common import torch_calibration

        budget, mixed = options.accuracy_budget, options.mixed
        assert budget is not None and mixed is not None
        start, stop = where = span(budget, getattr(options.method, "samples", 0), mixed)
        batches = torch_calibration(ctx, stop, "quantize int4 accuracy_budget")[start:]
        if len(batches) < budget.windows:
            raise StageError(
                f"quantize int4 accuracy_budget: judges candidates on calibration windows [{start}, {stop}) "
                f"(start + windows), data.calibration_windows gives {start + len(batches)}; raise "
                "data.calibration_windows or lower accuracy_budget.windows"
            )
        return cls(where, batches, window_nll(model_logits(model, batches), batches))


def fit(
    model: torch.nn.Module,
    choice: Choice,
    units: Mapping[str, Unit],
    eight: Mapping[str, torch.Tensor],
    judged: Slice,
    options: Int4Options,
    sizes: tuple[int, Mapping[str, int]],
    ctx: StageContext,
) -> tuple[Choice, dict[str, Any]]:
    """The budget's choice among the prefixes of `choice.eight` (the size budget's order within the cap):
    (that choice, `info["accuracy_budget"]`); the model holds its weights."""
    from compress.quant.mixed import Choice

    budget = options.accuracy_budget
    assert budget is not None
    order = [units[n] for n in choice.eight]
    k, steps = search(model, order, eight, judged.batches, judged.reference, budget, sizes, ctx)
    capped = any(r["gain"] > 0 and not r["chosen"] for r in choice.rows)
    found = budget_info(budget, judged.span, judged.reference, k, steps, choice.rows, choice.eight, capped)
    for row in choice.rows:
        row["chosen"] = row["node"] in found["eight_bit"]
    a, b = judged.span
    where = f"calibration windows {a}-{b - 1}" if b - a > 1 else f"calibration window {a}"
    ctx.reporter.log(
        f"  accuracy budget {'met' if found['met'] else 'NOT met'}: ppl rise {found['rise']:.2f} ± {found['se']:.2f} "
        f"% on {where} with {k} unit(s) at 8 bits (budget {budget.max_rise:g} %, {len(steps)} candidate(s) judged)"
    )
    return Choice(choice.eight[:k], steps[k]["predicted_bytes"], choice.rows), found
