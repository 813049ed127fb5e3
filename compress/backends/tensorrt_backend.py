"""Run a serialized TensorRT engine (an `engine` artifact) as a Session.

A thin adapter over `compress.gpu.tensorrt_runtime.TensorRTRunner`, which owns the CUDA buffers and the
stream; `tensorrt` and the GPU are required when the session opens (MissingDependencyError /
GpuUnavailableError), never at import. Host<->device copies are inside `run`, so a benchmark of this
session times what a caller with numpy arrays gets end to end.
"""

from __future__ import annotations

import os

import numpy as np


class TensorRTSession:
    backend = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike[str], *, device: int = 0) -> None:
        from compress.gpu.tensorrt_runtime import TensorRTRunner

        self.runner = TensorRTRunner(engine_path, device=device)
        self.input_names = list(self.runner.input_names)
        self.output_names = list(self.runner.output_names)

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in the engine's output order (the ONNX graph's)."""
        out = self.runner.run({name: inputs[name] for name in self.input_names})
        return [out[name] for name in self.output_names]
