"""Model families: one folder per family (vision, causal_lm, text_encoder); see ARCHITECTURE.md."""
