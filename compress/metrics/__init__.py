"""Metrics and gates. Family metrics (top-1, perplexity) are computed by the adapters' evaluate()."""
