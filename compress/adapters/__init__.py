"""Temporary home of the vision and causal-lm adapters while they move into `compress/families/`."""
