"""The causal-lm family (decoder LLMs)."""
