"""Errors a user can act on. Never `assert` on user input: raise one of these with what to do."""

from __future__ import annotations


class CompressError(Exception):
    """Base of every error `compress` raises on purpose."""


class ConfigError(CompressError):
    """A pipeline file or option is wrong. The message names file, key path, value and what is allowed."""


class MissingDependencyError(CompressError):
    """An optional package is not installed; the message says which extra provides it."""

    def __init__(self, package: str, extra: str | None = None, purpose: str = "") -> None:
        hint = f"pip install 'compress[{extra}]'" if extra else f"pip install {package}"
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(f"the package '{package}' is not installed{what}; install it with: {hint}")
        self.package = package
        self.extra = extra


class StageError(CompressError):
    """A stage ran but its result is not acceptable (e.g. export parity failed)."""


class RunLockedError(CompressError):
    """Another `compress run` holds the run folder's lock (exit code 6)."""
