"""Adapters: everything family-specific. Importing this package registers every adapter."""

from compress.adapters import causal_lm, vision  # noqa: F401
