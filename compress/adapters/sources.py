"""Paths and callables named in pipeline files: `pkg:DIST/PATH`, plain paths, `python:module:function`."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.errors import ConfigError


def resolve_path(value: str, base_dir: Path) -> Path:
    """A `pkg:` spec, an absolute path, or a path relative to `base_dir` or the working directory."""
    if value.startswith("pkg:"):
        from compress.llm.sources import resolve_pkg_path  # one resolver for every pkg: spec

        return resolve_pkg_path(value.removeprefix("pkg:"))
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    for candidate in (base_dir / path, Path.cwd() / path):
        if candidate.exists():
            return candidate
    return Path.cwd() / path


def import_callable(spec: str) -> Callable[..., Any]:
    """`python:package.module:function` -> the function."""
    body = spec.removeprefix("python:")
    module_name, _, attr = body.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"'{spec}': expected python:module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"'{spec}': cannot import module '{module_name}': {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"'{spec}': module '{module_name}' has no callable '{attr}'")
    return fn


def module_file(spec: str) -> Path | None:
    """The source file of a `python:module:function` spec's module, found without importing it (None if none).

    Cache keys hash it, so an edited factory rebuilds its source; modules it imports are not followed.
    """
    module_name = spec.removeprefix("python:").partition(":")[0]
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    origin = Path(found.origin) if found is not None and found.origin else None
    return origin if origin is not None and origin.is_file() else None
