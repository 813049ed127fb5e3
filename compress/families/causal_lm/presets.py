"""Named decoding presets: GenerationOptions keys from common practice, selectable by name and overridable
key by key.

    options = preset_options("balanced", temperature=0.8, seed=0)

`greedy` (every key at its default) stays what evaluation and gates use. The others follow what model cards
and serving defaults commonly ship: low temperature for factual text, temperature 0.7 with nucleus 0.9 for
general chat, near-1 temperature with nucleus 0.95 for open writing, and 4-beam search (length penalty
1.0, HF's default) for deterministic, high-likelihood text; all four with the CTRL repetition penalty 1.1.
No-repeat-n-gram is off in every preset (it can ban legitimate repeats such as code indentation); set
`no_repeat_ngram_size` to turn it on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compress.errors import ConfigError
from compress.families.causal_lm.generate import GenerationOptions

PRESETS: dict[str, dict[str, Any]] = {
    "greedy": {},
    "precise": {"do_sample": True, "temperature": 0.25, "repetition_penalty": 1.1},
    "balanced": {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1},
    "creative": {"do_sample": True, "temperature": 0.95, "top_p": 0.95, "repetition_penalty": 1.1},
    "beam": {"num_beams": 4, "length_penalty": 1.0, "repetition_penalty": 1.1},
}

#: the keys a preset sets or a user may override (what a report shows beside a preset's text)
PRESET_KEYS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "num_beams",
    "length_penalty",
    "repetition_penalty",
    "no_repeat_ngram_size",
)


def check_preset(name: str, where: str = "preset") -> str:
    """`name` if it is a preset, else a ConfigError naming `where` and listing the presets."""
    if name not in PRESETS:
        raise ConfigError(f"{where} = {name!r}: unknown preset; allowed: {', '.join(PRESETS)}")
    return name


def preset_options(name: str, overrides: Mapping[str, Any] | None = None, **more: Any) -> GenerationOptions:
    """GenerationOptions of preset `name`, with `overrides` (and keyword overrides) taking precedence.

    An override of None means "not given" and leaves the preset's value."""
    check_preset(name)
    given = {k: v for k, v in {**(overrides or {}), **more}.items() if v is not None}
    return GenerationOptions(**{**PRESETS[name], **given})


def preset_settings(options: GenerationOptions) -> dict[str, Any]:
    """The decoding keys of `options` that differ from greedy, e.g. for a report line."""
    default = GenerationOptions()
    return {k: getattr(options, k) for k in PRESET_KEYS if getattr(options, k) != getattr(default, k)}


def describe_presets() -> str:
    """One line per preset: its name and settings (for `compress generate --list-presets`)."""
    lines = []
    for name in PRESETS:
        settings = PRESETS[name]  # as the preset states them (beam's length_penalty 1.0 is also the default)
        shown = ", ".join(f"{k}={v}" for k, v in settings.items()) or "greedy decoding (the evaluation default)"
        lines.append(f"{name:<9} {shown}")
    return "\n".join(lines)
