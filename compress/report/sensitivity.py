"""The report's sensitivity and accuracy-budget section, from an INT8 artifact's info (`sensitivity`,
`accuracy_budget`, written by compress/stages/quantize/fallback.py for static Q/DQ and by
compress/stages/quantize/int8_lm_budget.py for weight-only decoders, `kind: perplexity`): the budget and what met
it (or the best candidate and what blocked it), the fallback steps, the nodes sorted by sensitivity, and a bar
plot."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compress.report.figures import png_bytes, pyplot

#: info keys this section shows (the stage-details list leaves them out)
KEYS = ("sensitivity", "accuracy_budget")
SHOWN = 20  # nodes in the table and the plot


def has_section(info: Mapping[str, Any]) -> bool:
    return "sensitivity" in info


def _decoder(info: Mapping[str, Any]) -> bool:
    return info["sensitivity"].get("kind") == "perplexity"


def summary(info: Mapping[str, Any]) -> list[str]:
    """Sentences on the budget: what was asked, what the search found on the slice, which nodes stay float."""
    sens, budget = info["sensitivity"], info.get("accuracy_budget")
    if _decoder(info):
        windows = sens["windows"]
        measured = (
            f"Measured in ONNX Runtime on calibration window(s) 0–{windows - 1} ({windows}), the graph that ships "
            f"(its int8 activations included). Full INT8: KL {sens['kl_int8']:.5f} nats per token vs the float "
            f"graph. Sensitivity: {sens['measure']}{' (table reused from the cache)' if sens.get('reused') else ''}."
        )
    else:
        start, stop = sens["slice"]
        full = sens["full_int8"]
        measured = (
            f"Measured on calibration samples {start}–{stop - 1} ({sens['samples']}), held apart from the "
            f"{start} the ranges came from. Full INT8 on that slice: relative output error "
            f"{full['error_pct']:.2f}% and top-1 agreement {full['agreement_pct']:.1f}% with the float graph. "
            f"Sensitivity: {sens['measure']}."
        )
    if budget is None:
        return [measured]
    return [measured, _decoder_budget(budget) if _decoder(info) else _static_budget(budget)]


def _static_budget(budget: Mapping[str, Any]) -> str:
    unit, metric = budget["unit"], budget["metric"]
    a, b = budget["slice"]
    rule = f"drop + {budget['sigmas']:g} × its standard error" if budget.get("sigmas") else "drop"
    head = (
        f"Budget: {metric} drop ≤ {budget['max_drop']:g} {unit} vs the float graph, at most "
        f"{budget['max_fallback']} node(s) back in float, judged ({rule}) on calibration samples {a}–{b - 1} "
        f"({budget['samples']}, held apart from the ranges' and the probes'; float graph "
        f"{budget['slice_reference']:.2f})."
    )
    estimate = f"drop {budget['drop']:.3f} ± {budget['se']:.3f} {unit} (paired standard error)"
    return _found(budget, head, estimate, "node(s)", "the most sensitive nodes still quantized")


def _decoder_budget(budget: Mapping[str, Any]) -> str:
    a, b = budget["slice"]
    rule = f"rise + {budget['sigmas']:g} × its standard error" if budget.get("sigmas") else "rise"
    head = (
        f"Budget: perplexity rise ≤ {budget['max_rise']:g} % vs the float graph, at most {budget['max_fallback']} "
        f"MatMul(s) back in float, judged ({rule}) on calibration windows {a}–{b - 1} (held apart from the "
        f"sensitivity's; float graph {budget['slice_reference']:.3f})."
    )
    estimate = f"rise {budget['rise']:.3f} ± {budget['se']:.3f} % (paired standard error over windows)"
    return _found(budget, head, estimate, "MatMul(s)", "the units ranked next")


def _found(budget: Mapping[str, Any], head: str, estimate: str, what: str, next_ones: str) -> str:
    """`head`, then what the search met (or the best candidate and what blocked it), then what stays float."""
    kept = [n["node"] for n in budget["float_nodes"]]
    if budget["met"]:
        found = f"Met on the slice with {len(kept)} {what} float: {estimate}"
    else:
        blocked = ", ".join(f"`{n['node']}`" for n in budget["blocked_by"]) or "none left"
        found = (
            f"**Not met** within {budget['max_fallback']} {what}. Best candidate (this artifact): {len(kept)} "
            f"{what} float, {estimate} on the slice; {next_ones}, which blocked it: {blocked}"
        )
    floated = ", ".join(f"`{n}`" for n in kept) or "none"
    return f"{head} {found}. Kept in float: {floated}. The evaluation-set result is the `accuracy_budget` gate."


def steps_rows(info: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    budget = info["accuracy_budget"]
    if _decoder(info):
        header = ["MatMuls float", "added", "ppl on the slice", "rise %", "± se"]
        cells = ("float_nodes", "added", "ppl", "rise", "se")
        return header, [[_cell(s[c]) for c in cells] for s in budget["steps"]]
    metric, unit = budget["metric"], budget["unit"]
    header = ["nodes float", "added", f"{metric} on the slice", f"drop ({unit})", "± se", "lost", "won"]
    rows = [
        [
            str(s["float_nodes"]),
            s["added"] or "–",
            f"{s[metric]:.2f}",
            f"{s['drop']:.3f}",
            f"{s['se']:.3f}",
            str(s["lost"]),
            str(s["won"]),
        ]
        for s in budget["steps"]
    ]
    return header, rows


def _cell(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def nodes_rows(info: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    floated = {n["node"] for n in (info.get("accuracy_budget") or {}).get("float_nodes", ())}
    if _decoder(info):
        header = ["rank", "MatMul", "KL gain (nats/token)", "KL with only it float", "kept float"]
        return header, [
            [str(i + 1), n["node"], f"{n['gain']:.5f}", f"{n['kl_float']:.5f}", "yes" if n["node"] in floated else ""]
            for i, n in enumerate(info["sensitivity"]["nodes"][:SHOWN])
        ]
    header = [
        "rank",
        "node",
        "op",
        "score",
        "error % (only it float)",
        "gain %",
        "error % (only it quantized)",
        "agreement % (only it float)",
        "kept float",
    ]
    rows = [
        [
            str(i + 1),
            n["node"],
            n["op_type"],
            f"{n['score']:.3f}",
            f"{n['error_pct']:.3f}",
            f"{n['gain_pct']:.3f}",
            f"{n['alone_pct']:.3f}",
            f"{n['agreement_pct']:.1f}",
            "yes" if n["node"] in floated else "",
        ]
        for i, n in enumerate(info["sensitivity"]["nodes"][:SHOWN])
    ]
    return header, rows


def figure(info: Mapping[str, Any], title: str) -> bytes:
    """Horizontal bars of the most sensitive nodes' scores; the ones kept in float in orange."""
    plt = pyplot()
    nodes = info["sensitivity"]["nodes"][:SHOWN][::-1]
    floated = {n["node"] for n in (info.get("accuracy_budget") or {}).get("float_nodes", ())}
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(nodes) + 1.2), dpi=100)
    colours = ["tab:orange" if n["node"] in floated else "tab:blue" for n in nodes]
    key, label = (
        ("gain", "KL won back with only it float (nats per token)")
        if _decoder(info)
        else ("score", "sensitivity score (output error %: gain when float + error when alone)")
    )
    ax.barh([n["node"][-40:] for n in nodes], [n[key] for n in nodes], color=colours)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel(label, fontsize=8)
    ax.set_title(f"{title}: most sensitive nodes (orange: kept float)", fontsize=9)
    return png_bytes(fig)
