"""Every registry entry is exercised: each stage, family, built-in vision backbone and decoder architecture
is named by at least one test module (a pipeline stage, a `family:`, a `builtin:` source, a quoted name)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


def _registries() -> dict[str, Iterable[str]]:
    from compress.families.causal_lm.archs import ARCHITECTURES
    from compress.families.vision.models import BUILTINS
    from compress.registry import registered_adapters, registered_stages

    return {
        "stage": registered_stages(),
        "adapter (family)": registered_adapters(),
        "vision builtin (compress.families.vision.models.BUILTINS)": BUILTINS,
        "decoder architecture (compress.families.causal_lm.archs.ARCHITECTURES)": ARCHITECTURES,
    }


def unexercised(entries: Iterable[str], texts: Iterable[str]) -> list[str]:
    """Entries no text names as a quoted string, a YAML stage (`- name:`), `family: name` or `builtin:name`."""
    corpus = "\n".join(texts)
    out = []
    for name in entries:
        n = re.escape(name)
        if not re.search(rf"[\"']{n}[\"']|- {n}:|family: {n}(?![\w-])|builtin:{n}(?![\w-])", corpus):
            out.append(name)
    return out


def test_the_check_finds_an_entry_no_test_names() -> None:
    texts = ["stages:\n  - export: {}", 'model: {family: vision, source: "builtin:resnet18"}', 'arch = "llama"']
    assert unexercised(["export", "vision", "resnet18", "llama"], texts) == []
    assert unexercised(["engine", "resnet1", "text-encoder"], [*texts, "family: vision-x"]) == [
        "engine",
        "resnet1",
        "text-encoder",
    ]


@pytest.mark.parametrize("registry", list(_registries()))
def test_every_registry_entry_is_named_by_a_test_module(registry: str) -> None:
    here = Path(__file__).resolve()
    texts = [p.read_text(encoding="utf-8") for p in TESTS.rglob("*.py") if p.resolve() != here]
    entries = list(_registries()[registry])
    assert entries, f"the {registry} registry is empty"
    missing = unexercised(entries, texts)
    assert not missing, f"{registry} entries no test module exercises: {', '.join(missing)}; add a tiny test"


def test_list_stages_writes_each_type_as_a_user_writes_it(capsys: pytest.CaptureFixture[str]) -> None:
    from compress.cli import main

    assert main(["list-stages"]) == 0
    out = capsys.readouterr().out
    assert "    sensitivity: SensitivityOptions | WindowSensitivity | None = None  — " in out
    assert "    accuracy_budget: AccuracyBudget | PerplexityBudget | None = None  — " in out
    assert "    target: PruneTarget = PruneTarget(channels=0.5, macs=None)" in out  # a default factory's value
    assert "Optional" not in out and "PydanticUndefined" not in out and "Annotated" not in out
