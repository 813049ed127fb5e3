"""The report's mixed 4/8-bit section, from an INT4 artifact's info `mixed` (compress/stages/quantize/mixed.py):
the budget, the predicted and real weight file, and the units sorted by KL gain per MB with the chosen ones;
with `accuracy_budget` (compress/stages/quantize/mixed_budget.py) what met it (or the best candidate and the
units ranked next) and the candidates' steps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KEYS = ("mixed", "accuracy_budget")  # info keys this section shows (the stage-details list leaves them out)
SHOWN = 40  # units in the table


def has_section(info: Mapping[str, Any]) -> bool:
    return isinstance(info.get("mixed"), Mapping) and "units" in info["mixed"]


def title(info: Mapping[str, Any]) -> str:
    return "an accuracy budget" if "accuracy_budget" in info else "a size budget"


def summary(info: Mapping[str, Any]) -> list[str]:
    mix = info["mixed"]
    start, stop = mix["window_slice"]
    chosen = mix["eight_bit"]
    real = mix.get("real_bytes")
    check = (
        f"real {real / 1e6:.2f} MB ({real} bytes, {'equal to' if real == mix['predicted_bytes'] else 'NOT'} the "
        "prediction)"
        if real is not None
        else "real size not recorded"
    )
    cap = "none" if mix["max_mb"] is None else f"weight file (model.onnx.data) ≤ {mix['max_mb']:g} MB"
    out = [
        f"{'Size cap' if 'accuracy_budget' in info else 'Budget'}: {cap}; all units at 4 bits "
        f"{mix['all_4bit_bytes'] / 1e6:.2f} MB, all at 8 bits (group {mix['group_size_8bit']}) "
        f"{mix['all_8bit_bytes'] / 1e6:.2f} MB. Chosen: {len(chosen)} of {len(mix['units'])} MatMulNBits units at "
        f"8 bits; predicted {mix['predicted_bytes'] / 1e6:.2f} MB ({mix['predicted_bytes']} bytes), {check}.",
        f"Sensitivity: KL(float ‖ quantized) per token on calibration windows {start}–{stop - 1}, held apart from "
        f"the quantizer's; all 4-bit {mix['kl_4bit']:.4f} nats; gain = what one unit at 8 bits wins back, ranked "
        f"per MB it costs{' (table reused from the cache)' if mix.get('sensitivity_reused') else ''}.",
    ]
    return out + ([_budget_sentence(info["accuracy_budget"])] if "accuracy_budget" in info else [])


def _budget_sentence(budget: Mapping[str, Any]) -> str:
    a, b = budget["slice"]
    rule = f"rise + {budget['sigmas']:g} × its standard error" if budget["sigmas"] else "rise"
    where = f"calibration windows {a}–{b - 1} ({b - a}" if b - a > 1 else f"calibration window {a} (one"
    head = (
        f"Accuracy budget: perplexity rise ≤ {budget['max_rise']:g} % vs the float input, judged ({rule}) on "
        f"{where}, held apart from the quantizer's and the sensitivity's; float {budget['slice_reference']:.2f}); "
        "candidates: all 4-bit, then the units above in rank order within the size cap."
    )
    estimate = (
        f"rise {budget['rise']:.2f} ± {budget['se']:.2f} % (paired standard error over windows)"
        if budget["windows"] > 1
        else f"rise {budget['rise']:.2f} % (one window: no standard error)"
    )
    units = len(budget["eight_bit"])
    if budget["met"]:
        return f"{head} Met on the slice with {units} unit(s) at 8 bits: {estimate}."
    blocked = ", ".join(f"`{u['node']}`{'' if u['fits'] else ' (over the cap)'}" for u in budget["blocked_by"])
    return (
        f"{head} **Not met** ({budget['stopped']}). Best candidate (this artifact): {units} unit(s) at 8 bits, "
        f"{estimate} on the slice; the units ranked next, which blocked it: {blocked or 'none left'}. "
        "The evaluation-set result is the `accuracy_budget` gate."
    )


#: the steps table: (header, cell of a step)
STEP_COLUMNS = (
    ("8-bit units", lambda s: str(s["units_8bit"])),
    ("added", lambda s: s["added"] or "–"),
    ("ppl on the slice", lambda s: f"{s['ppl']:.3f}"),
    ("rise %", lambda s: f"{s['rise']:.3f}"),
    ("± se", lambda s: f"{s['se']:.3f}"),
    ("predicted MB", lambda s: f"{s['predicted_bytes'] / 1e6:.3f}"),
)


def steps_rows(info: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    steps = info["accuracy_budget"]["steps"]
    return [h for h, _ in STEP_COLUMNS], [[cell(s) for _, cell in STEP_COLUMNS] for s in steps]


def units_rows(info: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["rank", "unit", "KL gain (nats)", "extra MB at 8 bits", "gain per MB", "8 bits"]
    rows = [
        [
            str(i + 1),
            u["node"],
            f"{u['gain']:.5f}",
            f"{u['cost_bytes'] / 1e6:.3f}",
            f"{u['gain_per_mb']:.5f}",
            "yes" if u["chosen"] else "",
        ]
        for i, u in enumerate(info["mixed"]["units"][:SHOWN])
    ]
    return header, rows
