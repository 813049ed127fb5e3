"""The explicit registries: stages and adapters (model families). No discovery by naming.

A stage is registered with `@register_stage(...)` in its own module under `compress/stages/`; the list
of modules to import lives in `compress/stages/__init__.py`, so `registered_stages()` is complete after
importing that package. An adapter is registered with `@register_adapter(family)` in its family's
`adapter` module; `ADAPTER_MODULES` lists those modules.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compress.families.base import Adapter
    from compress.stages.base import StageOptions


@dataclass(frozen=True)
class StageSpec:
    """What the runner knows about a stage: its options type, its function and its version.

    Bump `version` whenever a change to the stage's code changes its output, so cached artifacts of the
    old code are not reused.
    """

    kind: str
    options: type[StageOptions]
    run: Callable[..., Any]
    version: int
    summary: str


#: the module of each family's adapter (one per family; importing it registers the adapter)
ADAPTER_MODULES = (
    "compress.families.vision.adapter",
    "compress.families.causal_lm.adapter",
    "compress.families.text_encoder.adapter",
)

_STAGES: dict[str, StageSpec] = {}
_ADAPTERS: dict[str, type[Adapter]] = {}


def register_stage(kind: str, *, options: type[StageOptions], version: int = 1) -> Callable:
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if kind in _STAGES:
            raise RuntimeError(f"stage '{kind}' registered twice")
        summary = (
            (fn.__doc__ or options.__doc__ or "").strip().splitlines()[0] if (fn.__doc__ or options.__doc__) else ""
        )
        _STAGES[kind] = StageSpec(kind=kind, options=options, run=fn, version=version, summary=summary)
        return fn

    return wrap


def register_adapter(family: str) -> Callable[[type[Adapter]], type[Adapter]]:
    def wrap(cls: type[Adapter]) -> type[Adapter]:
        if family in _ADAPTERS:
            raise RuntimeError(f"adapter '{family}' registered twice")
        cls.family = family
        _ADAPTERS[family] = cls
        return cls

    return wrap


def registered_stages() -> dict[str, StageSpec]:
    import compress.stages  # noqa: F401  (registers every stage)

    return dict(_STAGES)


def registered_adapters() -> dict[str, type[Adapter]]:
    for module in ADAPTER_MODULES:
        importlib.import_module(module)  # registers the family's adapter

    return dict(_ADAPTERS)
