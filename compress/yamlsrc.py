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
    empty: frozenset[KeyPath] = frozenset()  # key paths written with no value at all (`gates:`)

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


#: A pipeline file has hundreds of nodes; aliases that expand beyond this are a "billion laughs" bomb.
MAX_NODES = 100_000
MAX_DEPTH = 64
_COLLECTION_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


class _Refused(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


class _Builder:
    """Turns a composed node tree into Python data, recording lines and empty values, within the caps.

    Aliases share nodes in the tree, so the expansion is counted while building, before it can blow up.
    """

    def __init__(self) -> None:
        self.lines: dict[KeyPath, int] = {}
        self.empty: set[KeyPath] = set()
        self.nodes = 0
        self.scalars = yaml.constructor.SafeConstructor()

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        self.nodes += 1
        line = node.start_mark.line + 1
        if self.nodes > MAX_NODES:
            raise _Refused(line, f"more than {MAX_NODES} values once aliases are expanded (an alias bomb?); refused")
        if len(path) > MAX_DEPTH:
            raise _Refused(line, f"nested more than {MAX_DEPTH} levels deep; refused")
        self.lines.setdefault(path, line)
        if isinstance(node, yaml.CollectionNode) and node.tag not in _COLLECTION_TAGS:
            raise _Refused(line, f"tag {node.tag} is not allowed (plain YAML only)")
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise _Refused(key_node.start_mark.line + 1, "a key must be a plain word or number")
                key = self.build(key_node, path)
                if key in out:
                    raise _Refused(key_node.start_mark.line + 1, f"duplicate key '{key}'")
                out[key] = self.build(value_node, (*path, key))
                self.lines[(*path, key)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        if node.tag == "tag:yaml.org,2002:null" and node.value == "" and node.style is None:
            self.empty.add(path)
        try:
            return self.scalars.construct_object(node)
        except yaml.YAMLError as exc:
            raise _Refused(line, str(getattr(exc, "problem", None) or exc)) from None


def _decode(file: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{file}:{line}: not UTF-8 text at byte {exc.start}; save the file as UTF-8") from None


def load_yaml(file: str | Path) -> Located:
    """Parse a YAML file; errors name the file and line."""
    file = Path(file)
    if not file.is_file():
        raise ConfigError(f"{file}: no such file")
    text = _decode(file, file.read_bytes())
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{file}: nested too deeply to be a pipeline file; refused") from None
    builder = _Builder()
    try:
        data = builder.build(node, ()) if node is not None else None
    except _Refused as exc:
        raise ConfigError(f"{file}:{exc.line}: {exc.message}") from None
    return Located(data=data, file=file, lines=builder.lines, empty=frozenset(builder.empty))
