"""Adapters: everything family-specific. Importing this package registers every adapter."""

from compress.adapters import vision  # noqa: F401
