"""The `vision` family: image classifiers and backbones.

`options.py` holds the `model:`/`data:` options, `model_io.py` builds, loads, saves and exports the model
(definitions in `models/`, Hugging Face ones in `hf.py`), `task.py` holds the data, evaluation and primary
metric, and `adapter.py` composes them into the adapter registered as `vision`. Nothing heavy is imported here.
"""
