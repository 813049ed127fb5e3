"""Model-source strings shared by adapters: `pkg:DIST/PATH` and `python:module:function`."""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.errors import ConfigError


def resolve_pkg_path(spec: str) -> Path:
    """`pkg:DISTRIBUTION/relative/path` -> the installed file, found through importlib.metadata.

    The package is not imported (some asset packages fail to import without their own dependencies).
    """
    body = spec.removeprefix("pkg:")
    dist_name, _, rel = body.partition("/")
    if not dist_name or not rel:
        raise ConfigError(f"'{spec}': expected pkg:DISTRIBUTION/relative/path")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"'{spec}': the distribution '{dist_name}' is not installed; pip install {dist_name}"
        ) from None
    for file in dist.files or []:
        if str(file) == rel:
            return Path(str(file.locate()))
    root = Path(str(dist.locate_file("")))
    if (root / rel).exists():
        return root / rel
    raise ConfigError(f"'{spec}': '{rel}' is not a file of the installed distribution '{dist_name}' ({root})")


def resolve_path(value: str, base_dir: Path) -> Path:
    """A `pkg:` spec, an absolute path, or a path relative to `base_dir` or the working directory."""
    if value.startswith("pkg:"):
        return resolve_pkg_path(value)
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
