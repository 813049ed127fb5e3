"""Backends run artifacts: the evaluator and the benchmark both go through them, so the number a gate
checks is the number of the file that ships.

- `torch`: torch checkpoints, eager, CPU.
- `onnxruntime`: ONNX files, CPU execution provider (CUDA / TensorRT providers with the `gpu` extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from compress.errors import ConfigError

if TYPE_CHECKING:
    from compress.adapters.base import Adapter
    from compress.artifact import Artifact

BACKENDS = ("torch", "onnxruntime")
DEFAULT_BACKEND = {"torch": "torch", "onnx": "onnxruntime"}


class Session(Protocol):
    backend: str

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def open_session(artifact: Artifact, adapter: Adapter, *, threads: int, backend: str | None = None) -> Session:
    """A session that runs `artifact` on `backend` (default: the natural one for its format)."""
    backend = backend or DEFAULT_BACKEND.get(artifact.format)
    if backend == "torch":
        from compress.backends.torch_backend import TorchSession

        return TorchSession(adapter.load_torch(artifact), list(adapter.io_spec().inputs), threads=threads)
    if backend == "onnxruntime":
        from compress.backends.onnxruntime_backend import OrtSession

        return OrtSession(artifact.main, threads=threads)
    raise ConfigError(f"no backend '{backend}' for a {artifact.format} artifact; allowed: {', '.join(BACKENDS)}")
