"""The report's mixed 4/8-bit section, from an INT4 artifact's info `mixed` (compress/stages/quantize/mixed.py):
the budget, the predicted and real weight file, and the units sorted by KL gain per MB with the chosen ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KEYS = ("mixed",)  # info keys this section shows (the stage-details list leaves them out)
SHOWN = 40  # units in the table


def has_section(info: Mapping[str, Any]) -> bool:
    return isinstance(info.get("mixed"), Mapping) and "units" in info["mixed"]


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
    return [
        f"Budget: weight file (model.onnx.data) ≤ {mix['max_mb']:g} MB; all units at 4 bits "
        f"{mix['all_4bit_bytes'] / 1e6:.2f} MB, all at 8 bits (group {mix['group_size_8bit']}) "
        f"{mix['all_8bit_bytes'] / 1e6:.2f} MB. Chosen: {len(chosen)} of {len(mix['units'])} MatMulNBits units at "
        f"8 bits; predicted {mix['predicted_bytes'] / 1e6:.2f} MB ({mix['predicted_bytes']} bytes), {check}.",
        f"Sensitivity: KL(float ‖ quantized) per token on calibration windows {start}–{stop - 1}, held apart from "
        f"the quantizer's; all 4-bit {mix['kl_4bit']:.4f} nats; gain = what one unit at 8 bits wins back, ranked "
        f"per MB it costs{' (table reused from the cache)' if mix.get('sensitivity_reused') else ''}.",
    ]


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
