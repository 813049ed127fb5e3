"""Temporary home of the causal-lm adapter while it moves into `compress/families/`."""
