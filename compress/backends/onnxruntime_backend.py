"""Run an ONNX file with ONNX Runtime's CPU execution provider."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


def session_options(threads: int | None, config: Mapping[str, str] | None = None):  # -> ort.SessionOptions
    """The options every ONNX Runtime session of `compress` is built with: `threads` intra-op threads
    (None: ONNX Runtime's default), sequential execution, quiet logs, and the session `config` entries."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    return opts


class OrtSession:
    backend = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int,
        providers: list[str] | None = None,
        session_config: Mapping[str, str] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(
            str(path), session_options(threads, session_config), providers=providers or ["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {name: inputs[name] for name in self.input_names})
