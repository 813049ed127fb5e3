"""The numbers behind the causal-lm pictures: where greedy continuations diverge, a failure card, the
per-window perplexity plot, and the decoding presets' continuations side by side (`data.presets`; gates read
the greedy continuations only)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from compress.report.figures import plain_log_ticks, png_bytes, pyplot

REPEAT_NGRAM, REPEAT_TIMES = 4, 3  # a repetition loop: some 4-gram of tokens occurs 3 times or more


def first_divergence(tokens: Sequence[int], reference: Sequence[int]) -> int | None:
    """Index of the first token that differs from `reference` (or where one ends first); None if identical."""
    for i, (a, b) in enumerate(zip(tokens, reference, strict=False)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def has_repetition_loop(tokens: Sequence[int], n: int = REPEAT_NGRAM, times: int = REPEAT_TIMES) -> bool:
    counts: dict[tuple[int, ...], int] = {}
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= times:
            return True
    return False


def _non_text(text: str) -> bool:
    """U+FFFD (bytes that are not UTF-8) or control characters other than whitespace."""
    return any(ch == "\ufffd" or (ord(ch) < 32 and ch not in "\n\t\r") for ch in text)


def failure_card(continuations: Sequence[Sequence[int]], texts: Sequence[str], expected: int) -> dict[str, int]:
    """Per artifact: prompts whose continuation loops, is empty, stops short of `expected` tokens, or holds
    non-text bytes."""
    return {
        "prompts": len(continuations),
        "repetition loop": sum(has_repetition_loop(c) for c in continuations),
        "empty": sum(len(c) == 0 or not t.strip() for c, t in zip(continuations, texts, strict=True)),
        "truncated": sum(0 < len(c) < expected for c in continuations),
        "non-text bytes": sum(_non_text(t) for t in texts),
    }


def window_ppl_figure(window_nll: Mapping[str, np.ndarray]) -> bytes:
    """Perplexity of every evaluation window, one line per artifact."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    for name, nll in window_nll.items():
        ax.plot(np.arange(len(nll)), np.exp(nll), marker="o", ms=3, label=name)
    ax.set_xlabel("evaluation window")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return png_bytes(fig)


@dataclass(frozen=True)
class PresetTexts:
    """Per prompt, per artifact, per preset (greedy first): the continuation's text; and each preset's settings."""

    prompts: list[str]
    settings: dict[str, dict[str, Any]]
    texts: list[dict[str, dict[str, str]]]  # [prompt][artifact][preset]


def preset_texts(
    outputs: Mapping[str, Mapping[str, Any]], decode: Callable[[Sequence[int]], list[str]]
) -> PresetTexts | None:
    """The preset continuations of every artifact (`outputs`: artifact -> its evaluation's outputs), decoded;
    None when no artifact recorded any."""
    recorded = {n: o for n, o in outputs.items() if o.get("presets")}
    if not recorded:
        return None
    first = next(iter(recorded.values()))["presets"]
    settings = {"greedy": {}} | {name: run["settings"] for name, run in first["runs"].items()}
    texts: list[dict[str, dict[str, str]]] = []
    for p in range(len(first["prompts"])):
        row: dict[str, dict[str, str]] = {}
        for name, out in recorded.items():
            runs = {"greedy": out.get("greedy", [])} | {k: r["tokens"] for k, r in out["presets"]["runs"].items()}
            row[name] = {k: "".join(decode(tokens[p])) for k, tokens in runs.items() if p < len(tokens)}
        texts.append(row)
    return PresetTexts(list(first["prompts"]), settings, texts)


def settings_text(settings: Mapping[str, Any]) -> str:
    """`temperature 0.7, top_p 0.9, ...` ("greedy" for none)."""
    return ", ".join(f"{k} {v}" for k, v in settings.items()) or "greedy"


def _cell(text: str) -> str:
    """A continuation as one markdown table cell: pipes escaped, newlines shown as ⏎."""
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "⏎ ").strip() or "(empty)"


def presets_markdown(view: PresetTexts) -> list[str]:
    """report.md lines: the presets' settings, then one table per prompt (artifacts x presets)."""
    out = ["## Decoding presets on the fixed prompts", ""]
    out += [f"- `{name}`: {settings_text(s)}" for name, s in view.settings.items()]
    out += ["", "Each artifact's continuation per preset (⏎ = newline); gates read the greedy ones only.", ""]
    names = list(view.settings)
    for prompt, row in zip(view.prompts, view.texts, strict=True):
        out += [f"**{_cell(prompt)}**", "", "| artifact | " + " | ".join(names) + " |"]
        out.append("|---" * (len(names) + 1) + "|")
        out += [f"| {a} | " + " | ".join(_cell(texts.get(n, "–")) for n in names) + " |" for a, texts in row.items()]
        out.append("")
    return out
