"""Adapters: everything family-specific. Importing this package registers every adapter."""

from compress.adapters import causal_lm, vision  # noqa: F401
from compress.families.text_encoder import adapter as text_encoder  # noqa: F401
