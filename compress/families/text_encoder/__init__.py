"""The `text-encoder` family: BERT-style sentence encoders, mean-pooled embeddings, retrieval metrics.

`model_io.py` loads, saves and exports the model, `task.py` builds the retrieval set and scores it, and
`adapter.py` composes them into the adapter registered as `text-encoder`. Nothing heavy is imported here.
"""
