"""Run an ONNX file with ONNX Runtime's CUDA or TensorRT execution provider (the `gpu` extra).

`compress.gpu.ort_providers.make_gpu_session` refuses to run when ONNX Runtime would silently fall back to
the CPU provider, so a number labelled `onnxruntime-cuda` is a GPU number. The TensorRT provider builds
its engines on first use; they are cached under the run cache so a later session starts fast.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from compress.backends.onnxruntime_backend import session_options


class OrtGpuSession:
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        provider: str,
        threads: int,
        session_config: Mapping[str, str] | None = None,
        int8: bool = False,
        engine_cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        from compress.gpu.ort_providers import make_gpu_session

        self.backend = f"onnxruntime-{provider}"
        options: dict[str, object] = {}
        if provider == "tensorrt":
            # A Q/DQ graph only runs in INT8 inside TensorRT with int8 mode on; fp16 stays off so the
            # provider runs the precision of the file, as the CPU provider does.
            options["int8"] = int8
            if engine_cache_dir is not None:
                Path(engine_cache_dir).mkdir(parents=True, exist_ok=True)
                options["engine_cache_dir"] = engine_cache_dir
        self.session = make_gpu_session(
            path, provider, session_options=session_options(threads, session_config), **options
        )
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {name: inputs[name] for name in self.input_names})
