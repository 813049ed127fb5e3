"""The vision family: image classifiers and backbones (definitions in models/, Hugging Face ones in hf.py)."""
