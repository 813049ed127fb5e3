"""YAML loading that remembers where each key came from, so errors can say `file:line`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compress.errors import ConfigError

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Located:
    """A parsed YAML document plus the line (1-based) of every key path in it."""

    data: Any
    file: Path
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def line(self, path: Sequence[str | int]) -> int | None:
        """Line of the deepest prefix of `path` that exists in the file."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())

    def where(self, path: Sequence[str | int]) -> str:
        line = self.line(path)
        return f"{self.file}:{line}" if line else str(self.file)


def format_path(path: Sequence[str | int]) -> str:
    """('stages', 2, 'quantize', 'bits') -> 'stages[2].quantize.bits'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


# A pipeline file is plain data: any other tag (`!!python/object`, `!custom`) is refused, not ignored.
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float", "str", "seq", "map", "timestamp")}


def _check_tag(node: yaml.Node) -> None:
    if node.tag not in _PLAIN_TAGS:
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise ConfigError(
            f"line {node.start_mark.line + 1}: YAML tag {tag} is not allowed; a pipeline file holds plain data "
            "(mappings, lists, strings, numbers, booleans, null)"
        )


def _construct(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> Any:
    lines[path] = node.start_mark.line + 1
    _check_tag(node)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            _check_tag(key_node)
            key = yaml.safe_load(yaml.serialize(key_node))
            if key in out:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key '{key}'")
            out[key] = _construct(value_node, (*path, key), lines)
            lines[(*path, key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*path, i), lines) for i, item in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


def load_yaml(file: str | Path) -> Located:
    """Parse a YAML file; errors name the file and line."""
    file = Path(file)
    if not file.is_file():
        raise ConfigError(f"{file}: no such file")
    text = file.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    lines: dict[KeyPath, int] = {}
    try:
        data = _construct(node, (), lines) if node is not None else None
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None
    return Located(data=data, file=file, lines=lines)
