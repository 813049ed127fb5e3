"""The `causal-lm` family: decoder LLMs.

`options.py` holds the `model:` / `data:` options, `model_io.py` loads (GGUF converted once), refuses
non-decoders and saves the model, `export.py` writes the KV-cache ONNX decoder and checks parity,
`task.py` reads text into windows and scores perplexity / agreement / greedy match, `sessions.py` holds
the decoder sessions (registered with `compress.backends`), `generate.py` the sampling options and logits
processors, `archs.py` the architecture maps, and `adapter.py` composes them into the adapter registered as
`causal-lm`. Nothing heavy is imported here.
"""
