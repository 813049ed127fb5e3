"""Sensitivity and the accuracy-budget fallback of weight-only INT8 decoders (MatMulNBits), judged in ONNX Runtime.

```yaml
- quantize: {precision: int8, method: weight-only, group_size: 64,
             sensitivity: {windows: 1},
             accuracy_budget: {max_rise: 0.3, windows: 4, max_fallback: 8, sigmas: 0}}
```

Units: the graph's MatMulNBits nodes, named by the float MatMul they replace, the lm_head included (a tied
embedding keeps reading its 8-bit codes when the head goes float: SmolLM2's head then costs +113 MB, and it is
the most sensitive unit there, a third of the full graph's KL). Weight-only RTN reads no calibration data, so the
sensitivity runs on calibration windows [0, sensitivity.windows) and the candidates are judged on the
`accuracy_budget.windows` after them (`start` moves them; one inside the sensitivity's is refused at validation),
never on the evaluation windows.

Sensitivity of a unit: the KL divergence per token (float graph's next-token distribution vs the graph's)
won back when only that node goes back to its float MatMul in the full INT8 graph, measured in ONNX Runtime on
the graph that ships: with `accuracy_level: 4` the kernel also quantizes the activations to int8 per block,
an error a torch replay of the dequantized weights would not see. One graph per unit (no `alone` probe as in
static INT8: weight-only units do not feed each other quantized inputs, so a unit's error does not depend on
which others are quantized the way a Q/DQ node's does).

The fallback returns units to float in that order, one at a time, the full INT8 graph being the first
candidate, until the perplexity rise vs the float graph on the acceptance windows (+ `sigmas` x its paired
standard error over windows) is within `max_rise`, or `max_fallback` units are float; then the best candidate
seen (smallest bound, fewest float units on ties) is the artifact, and its info names the units ranked next
(what blocked it). The artifact is the chosen candidate's graph itself, as judged (the floated units' 8-bit
tensors removed). The runner evaluates it on the evaluation windows, and the `accuracy_budget` gate
(compress/metrics/gates.py) bounds the rise there.

Each probe and candidate is a copy of the quantizer's graph with some MatMulNBits nodes swapped back for the
float graph's MatMul (matched by output name), written to a scratch folder and loaded in a fresh session.
Own code: ONNX Runtime's MatMulNBitsQuantizer takes `nodes_to_exclude` but measures nothing; no maintained
library searches which MatMuls of a weight-only graph to leave float.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from compress.errors import StageError
from compress.schema import PositiveCount
from compress.stages.quantize.common import RiseBudget

if TYPE_CHECKING:
    import onnx

    from compress.stages.base import StageContext

VERSION = 2  # of the search (joins the cache key); 2: the lm_head is a unit
_BLOCKERS = 5  # units named as what blocked an unmet budget
_ONE_FILE = 1.8e9  # bytes: probes are written as one protobuf file (limit 2 GiB)


class WindowSensitivity(BaseModel):
    """`sensitivity: {windows: N}`: per-unit sensitivity on the first N calibration windows (weight-only INT8
    of a decoder: its quantizer reads no calibration data)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    windows: PositiveCount = Field(1, description="calibration windows the per-unit KL is measured on")


class PerplexityBudget(RiseBudget):
    """`accuracy_budget: {max_rise: 0.3, windows: 4, max_fallback: 8}`: the perplexity rise (%) vs the float
    input a weight-only INT8 decoder must hold."""

    max_fallback: PositiveCount = Field(10, description="most MatMuls returned to float before giving up")

    def gate_detail(self, found: Mapping[str, Any]) -> str:
        detail = (
            f"calibration slice ({found.get('windows', '?')} windows): ppl rise {found.get('rise', float('nan')):.3f} "
            f"± {found.get('se', float('nan')):.3f} % with {len(found.get('float_nodes', ()))} MatMul(s) float"
        )
        if not found.get("met", False):
            blocked = ", ".join(n["node"] for n in found.get("blocked_by", ())) or "none left"
            detail += f"; budget not met within max_fallback {self.max_fallback} (next: {blocked})"
        return detail


def span(budget: PerplexityBudget, sensitivity: WindowSensitivity) -> tuple[int, int]:
    """Calibration windows [start, stop) the candidates are judged on."""
    start = sensitivity.windows if budget.start is None else budget.start
    return start, start + budget.windows


def refusals(budget: PerplexityBudget | None, sensitivity: WindowSensitivity) -> list[tuple[str, str]]:
    """A `start` inside the sensitivity's windows; `sigmas` on one window."""
    if budget is None:
        return []
    problems = []
    if budget.start is not None and budget.start < sensitivity.windows:
        problems.append(
            (
                "accuracy_budget",
                f"start {budget.start} overlaps the calibration windows [0, {sensitivity.windows}) the sensitivity "
                f"(sensitivity.windows) uses; set start >= {sensitivity.windows} or remove it",
            )
        )
    return problems + budget.sigmas_problems()


class FloatSwaps:
    """The quantizer's graph with any set of its MatMulNBits units swapped back for the float graph's MatMul."""

    def __init__(self, quantized: onnx.ModelProto, float_model: onnx.ModelProto) -> None:
        floats = {n.output[0]: n for n in float_model.graph.node if n.op_type == "MatMul"}
        weights = {t.name: t for t in float_model.graph.initializer}
        self.model = quantized
        self._index: dict[str, tuple[int, onnx.NodeProto, onnx.TensorProto]] = {}
        for i, node in enumerate(quantized.graph.node):
            f = floats.get(node.output[0]) if node.op_type == "MatMulNBits" else None
            if f is not None and f.input[1] in weights:
                self._index[f.name] = (i, f, weights[f.input[1]])

    @property
    def units(self) -> list[str]:
        """The swappable units, in graph order, by the name of the float MatMul they become."""
        return list(self._index)

    @contextmanager
    def floated(self, names: Sequence[str]) -> Iterator[onnx.ModelProto]:
        """The graph with `names` float while the block runs (each node swapped for the float MatMul, its float
        weight added; its 8-bit tensors stay, unread: ONNX Runtime drops them at load); all put back after."""
        import onnx

        graph = self.model.graph
        saved = [(self._index[n][0], onnx.NodeProto()) for n in names]
        for (i, copy), name in zip(saved, names, strict=True):
            copy.CopyFrom(graph.node[i])
            graph.node[i].CopyFrom(self._index[name][1])
        present = {t.name for t in graph.initializer}
        added = [self._index[n][2] for n in names if self._index[n][2].name not in present]
        graph.initializer.extend(added)
        try:
            yield self.model
        finally:
            for i, copy in saved:
                graph.node[i].CopyFrom(copy)
            for _ in added:
                graph.initializer.pop()

    def write(self, names: Sequence[str], path: Path) -> Path:
        """One self-contained file of the graph with `names` float (scratch probes and candidates)."""
        import onnx

        with self.floated(names) as model:
            onnx.save_model(model, str(path))
        return path

    def final(self, names: Sequence[str]) -> onnx.ModelProto:
        """A copy of the graph with `names` float, without the 8-bit tensors no node reads any more."""
        import onnx

        out = onnx.ModelProto()
        with self.floated(names) as model:
            out.CopyFrom(model)
        read = {x for node in out.graph.node for x in node.input}
        if any(t.name not in read for t in out.graph.initializer):
            keep = [t for t in out.graph.initializer if t.name in read]
            del out.graph.initializer[:]
            out.graph.initializer.extend(keep)
        return out


def _windows(ctx: StageContext, start: int, stop: int, what: str) -> list[np.ndarray]:
    """Calibration windows [start, stop) as (1, T) token arrays; StageError when the data holds fewer."""
    cal = [b["input_ids"] for b in ctx.adapter.calibration_inputs(stop, batch_size=1)][start:]
    if len(cal) < stop - start:
        raise StageError(
            f"quantize int8: {what} needs calibration windows [{start}, {stop}), data.calibration_windows gives "
            f"{start + len(cal)}; raise data.calibration_windows or lower {what}.windows"
        )
    return cal


def _logits(path: Path, windows: Sequence[np.ndarray], ctx: StageContext) -> list[np.ndarray]:
    from compress.families.causal_lm.sessions import OrtCausalLM

    session = OrtCausalLM(path, threads=ctx.threads)
    return [session.logits(w) for w in windows]


def _nll(logits: Sequence[np.ndarray], windows: Sequence[np.ndarray]) -> np.ndarray:
    from compress.stages.quantize.mixed_budget import window_nll

    return window_nll(logits, [{"input_ids": w} for w in windows])


def _kl(reference: Sequence[np.ndarray], logits: Sequence[np.ndarray]) -> float:
    import torch

    from compress.quant.mixed import kl_divergence

    pairs = zip(reference, logits, strict=True)
    return sum(kl_divergence(torch.from_numpy(r), torch.from_numpy(o)) for r, o in pairs) / len(reference)


def sensitivities(
    swaps: FloatSwaps, float_path: Path, work: Path, windows: Sequence[np.ndarray], ctx: StageContext
) -> dict[str, Any]:
    """Per unit: the KL per token vs the float graph with only that unit float, sorted most sensitive first."""
    reference = _logits(float_path, windows, ctx)
    probe = work / "probe.onnx"
    base = _kl(reference, _logits(swaps.write([], probe), windows, ctx))
    rows = []
    with ctx.reporter.task("sensitivity (one MatMul float at a time)", total=len(swaps.units)) as task:
        for unit in swaps.units:
            kl = _kl(reference, _logits(swaps.write([unit], probe), windows, ctx))
            rows.append({"node": unit, "kl_float": round(kl, 6), "gain": round(base - kl, 6)})
            task.advance(1)
    rows.sort(key=lambda r: (-r["gain"], r["node"]))
    return {
        "kind": "perplexity",
        "windows": len(windows),
        "slice": [0, len(windows)],
        "measure": "KL(float graph ‖ graph) per token, in nats, with only this MatMul float; gain = what that wins "
        "back from the full INT8 graph",
        "kl_int8": round(base, 6),
        "nodes": rows,
    }


def fall_back(
    swaps: FloatSwaps,
    ranked: Sequence[Mapping[str, Any]],
    float_path: Path,
    work: Path,
    budget: PerplexityBudget,
    where: tuple[int, int],
    windows: Sequence[np.ndarray],
    ctx: StageContext,
) -> tuple[list[str], dict[str, Any]]:
    """Greedy fallback (module docstring) on `windows`, calibration windows `where`: (the float units chosen,
    the info)."""
    from compress.stages.quantize.mixed_budget import paired_rise

    reference = _nll(_logits(float_path, windows, ctx), windows)
    order = [r["node"] for r in ranked]
    steps: list[dict[str, Any]] = []
    best: tuple[float, int] | None = None
    candidate = work / "candidate.onnx"
    for k in range(min(budget.max_fallback, len(order)) + 1):
        nll = _nll(_logits(swaps.write(order[:k], candidate), windows, ctx), windows)
        rise, se = paired_rise(nll, reference)
        bound = rise + budget.sigmas * se
        steps.append(
            {
                "float_nodes": k,
                "added": order[k - 1] if k else None,
                "ppl": round(float(np.exp(nll.mean())), 4),
                "rise": round(rise, 4),
                "se": round(se, 4),
                "bound": round(bound, 4),
            }
        )
        ctx.reporter.log(f"  fallback {k} MatMul(s) float: ppl rise {rise:.3f} ± {se:.3f} % on the slice")
        if best is None or bound < best[0]:
            best = (bound, k)
        if bound <= budget.max_rise:
            break
    assert best is not None  # k = 0 always runs
    k = best[1]
    met = best[0] <= budget.max_rise
    by_node = {r["node"]: dict(r) for r in ranked}
    chosen = steps[k]
    info = {
        "metric": "ppl",
        "unit": "%",
        "max_rise": budget.max_rise,
        "max_fallback": budget.max_fallback,
        "sigmas": budget.sigmas,
        "windows": budget.windows,
        "slice": list(where),
        "slice_reference": round(float(np.exp(reference.mean())), 4),
        "met": met,
        "rise": chosen["rise"],
        "se": chosen["se"],
        "bound": chosen["bound"],
        "float_nodes": [by_node[n] for n in order[:k]],
        "steps": steps,
        "blocked_by": [] if met else [by_node[n] for n in order[k : k + _BLOCKERS]],
    }
    ctx.reporter.log(
        f"  accuracy budget {'met' if met else 'NOT met'}: ppl rise {chosen['rise']:.3f} ± {chosen['se']:.3f} % on "
        f"calibration windows {where[0]}-{where[1] - 1} with {k} MatMul(s) float (budget {budget.max_rise:g} %)"
    )
    return order[:k], info


def budget_search(
    quantized: onnx.ModelProto,
    float_path: Path,
    out: Path,
    sensitivity: WindowSensitivity,
    budget: PerplexityBudget | None,
    ctx: StageContext,
    external: bool,
    table_key: str,
) -> dict[str, Any]:
    """Sensitivity (always; the table is cached under `table_key`: what the quantized graph and the windows
    depend on, so budgets of one pipeline share it) and, with a budget, the fallback; writes the artifact's graph
    at `out`."""
    import onnx

    from compress.quant.algorithms.int8_matmul import save_quantized
    from compress.stages.quantize.common import cached_table

    if quantized.ByteSize() > _ONE_FILE:
        raise StageError(
            "quantize int8: sensitivity / accuracy_budget write each probe as one file (< 1.8 GB); this INT8 graph "
            f"is {quantized.ByteSize() / 1e9:.2f} GB; remove them"
        )
    swaps = FloatSwaps(quantized, onnx.load(str(float_path)))
    if not swaps.units:
        raise StageError(
            "quantize int8: sensitivity found no MatMulNBits node beside a float MatMul of the input to return to "
            "float (nothing quantized); remove sensitivity / accuracy_budget"
        )
    if budget is not None:  # read before any probe: a slice past the data fails first
        where = span(budget, sensitivity)
        judged = _windows(ctx, *where, "accuracy_budget")
    work = out.parent / "_probe"
    work.mkdir(exist_ok=True)
    try:
        windows = _windows(ctx, 0, sensitivity.windows, "sensitivity")
        report, reused = cached_table(
            "int8-sensitivity", table_key, ctx, lambda: sensitivities(swaps, float_path, work, windows, ctx)
        )
        if {n["node"] for n in report["nodes"]} != set(swaps.units):  # a table keyed for another graph
            raise StageError("quantize int8: the cached sensitivity table names other units than this graph's")
        info: dict[str, Any] = {"sensitivity": {**report, "reused": reused}}
        floated: list[str] = []
        if budget is not None:
            floated, info["accuracy_budget"] = fall_back(
                swaps, report["nodes"], float_path, work, budget, where, judged, ctx
            )
    finally:  # a failed or interrupted probe leaves no scratch graph in the artifact's folder
        shutil.rmtree(work, ignore_errors=True)
    save_quantized(swaps.final(floated), out, external=external)
    return info
