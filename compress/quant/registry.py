"""Small explicit registries of options models keyed by their `name`, and the key check behind them.

`method:` and `target:` take a name or a mapping `{name: ..., <that entry's keys>}`; a string is
shorthand for `{name: ...}`, so both validate to the same model (and the same cache key). A key that
belongs to another entry is refused naming what the chosen one takes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict


class NamedOptions(BaseModel):
    """An algorithm's or a target's own options; `name` is its discriminator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __repr__(self) -> str:
        """As the pipeline file writes it: the name and the keys that were given."""
        given = [
            f"{k}: {getattr(self, k)}" for k in type(self).model_fields if k in self.model_fields_set and k != "name"
        ]
        return "{" + ", ".join([f"name: {getattr(self, 'name', '?')}", *given]) + "}"


def registry(entries: Iterable[type[NamedOptions]], vocabulary: tuple[str, ...]) -> dict[str, type[NamedOptions]]:
    """{name: options model}; refuses an entry whose name the vocabulary does not list."""
    out = {cls.model_fields["name"].default: cls for cls in entries}
    unknown = sorted(set(out) - set(vocabulary))
    if unknown:
        raise RuntimeError(f"{', '.join(unknown)}: not in compress.quant.vocab ({', '.join(vocabulary)})")
    return out


def keys_of(cls: type[NamedOptions]) -> list[str]:
    return list(cls.model_fields)


def named(entries: Mapping[str, type[NamedOptions]], what: str) -> Callable[[Any], Any]:
    """A before-validator: a string becomes `{name: s}`; a mapping's keys must belong to its entry."""

    def normalize(value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        if not isinstance(value, Mapping) or value.get("name") not in entries:
            return value  # pydantic's discriminator says what is allowed
        cls = entries[value["name"]]
        for key in value:
            if key in cls.model_fields:
                continue
            owners = [n for n, c in entries.items() if key in c.model_fields]
            elsewhere = f" ({key} is a key of {what} {', '.join(owners)})" if owners else ""
            raise ValueError(
                f"{what} {value['name']} has no key '{key}'{elsewhere}; {what} {value['name']} takes: "
                f"{', '.join(keys_of(cls))}"
            )
        return value

    return normalize


def owner_of(key: str, groups: Mapping[str, Mapping[str, type[NamedOptions]]]) -> str | None:
    """'method gptq' / 'target onnxruntime-cpu' when `key` is one of that entry's keys (first found)."""
    for what, entries in groups.items():
        for name, cls in entries.items():
            if key != "name" and key in cls.model_fields:
                return f"{what} {name}"
    return None
