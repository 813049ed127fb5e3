"""Run a serialized TensorRT engine (TensorRT 10.x name-based I/O API) with CUDA-event timing.

Device memory, streams and events come from `torch.cuda` (documented: torch.cuda.Stream,
torch.cuda.Event(enable_timing=True), Event.elapsed_time), chosen over cuda-python because torch is
already a dependency and gives allocation, copies and events in one place. TensorRT calls used:
Runtime.deserialize_cuda_engine, ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode /
get_tensor_dtype, IExecutionContext.set_input_shape / get_tensor_shape / set_tensor_address /
execute_async_v3.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compress.errors import ConfigError, MissingDependencyError, StageError
from compress.gpu.availability import import_tensorrt, require_gpu

# TensorRT DataType member name -> torch dtype name (resolved lazily so torch is imported only here).
_TORCH_DTYPE = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}


@dataclass(frozen=True)
class TimingResult:
    """Per-iteration GPU latency (ms, CUDA events around execute_async_v3 on one stream)."""

    latencies_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return float(np.median(self.latencies_ms))


def match_inputs(expected: list[str], given: Mapping[str, object]) -> None:
    """ConfigError naming missing and unexpected input names."""
    missing = [n for n in expected if n not in given]
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        raise ConfigError(f"engine inputs are {expected}; missing {missing or 'none'}, unexpected {extra or 'none'}")


def torch_dtype_name(trt_dtype_name: str) -> str:
    """torch dtype name for a TensorRT DataType name; StageError for types torch cannot hold (FP8, INT4)."""
    if trt_dtype_name not in _TORCH_DTYPE:
        raise StageError(
            f"engine I/O tensor of TensorRT type {trt_dtype_name} cannot be bound from torch; "
            f"supported I/O types: {', '.join(_TORCH_DTYPE)}"
        )
    return _TORCH_DTYPE[trt_dtype_name]


class TensorRTRunner:
    """Deserialize an engine once; run it on numpy inputs and time it.

    Usage::

        runner = TensorRTRunner("model.engine")
        outputs = runner.run({"x": batch})            # dict name -> np.ndarray
        timing = runner.time({"x": batch}, warmup=10, iterations=100)
    """

    def __init__(self, engine_path: str | os.PathLike[str], *, device: int = 0) -> None:
        trt = import_tensorrt(purpose="running TensorRT engines")
        try:
            import torch
        except ImportError as e:  # torch is a core dependency; this guards odd installs
            raise MissingDependencyError("torch", purpose="CUDA buffers for TensorRT") from e
        require_gpu("running a TensorRT engine")
        if not torch.cuda.is_available():
            raise StageError(
                "torch cannot see a CUDA device (CPU-only torch build?); the TensorRT runner uses "
                "torch.cuda for device buffers and events: install a CUDA build of torch"
            )
        path = Path(engine_path)
        if not path.is_file():
            raise ConfigError(f"engine file {path} does not exist")
        self._trt, self._torch = trt, torch
        self.device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise StageError(
                f"TensorRT could not deserialize {path}: engines only load on the TensorRT version and "
                "GPU architecture that built them"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.stream = torch.cuda.Stream(device=self.device)

    def _dtype(self, name: str):  # noqa: ANN202 - torch.dtype
        return getattr(self._torch, torch_dtype_name(self.engine.get_tensor_dtype(name).name))

    def _bind(self, inputs: Mapping[str, np.ndarray]) -> dict[str, object]:
        match_inputs(self.input_names, inputs)
        torch = self._torch
        buffers: dict[str, object] = {}
        for name in self.input_names:
            t = torch.as_tensor(np.ascontiguousarray(inputs[name])).to(self.device, self._dtype(name))
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ConfigError(
                    f"input '{name}' shape {tuple(t.shape)} is outside the engine's optimisation "
                    f"profile {self.engine.get_tensor_profile_shape(name, 0)} (min, opt, max)"
                )
            buffers[name] = t
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise StageError(f"output '{name}' shape {shape} is unresolved after setting input shapes")
            buffers[name] = torch.empty(shape, dtype=self._dtype(name), device=self.device)
        for name, t in buffers.items():
            self.context.set_tensor_address(name, t.data_ptr())
        return buffers

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise StageError("TensorRT execute_async_v3 returned False; see the TensorRT log")

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name, as numpy arrays on the host."""
        buffers = self._bind(inputs)
        with self._torch.cuda.stream(self.stream):
            self._execute()
        self.stream.synchronize()
        return {n: buffers[n].cpu().numpy() for n in self.output_names}  # type: ignore[attr-defined]

    def time(self, inputs: Mapping[str, np.ndarray], *, warmup: int = 10, iterations: int = 100) -> TimingResult:
        """GPU time per execution, measured with CUDA events recorded on the runner's stream."""
        if warmup < 0 or iterations < 1:
            raise ConfigError(f"warmup = {warmup}, iterations = {iterations}; need warmup >= 0, iterations >= 1")
        self._bind(inputs)
        torch = self._torch
        for _ in range(warmup):
            self._execute()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iterations)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iterations)]
        for s, e in zip(starts, ends, strict=True):
            s.record(self.stream)
            self._execute()
            e.record(self.stream)
        self.stream.synchronize()
        return TimingResult(tuple(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)))
