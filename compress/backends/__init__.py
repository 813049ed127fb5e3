"""Backends run artifacts: the evaluator and the benchmark both go through them, so the number a gate
checks is the number of the file that ships.

- `torch`: torch checkpoints, eager, CPU.
- `onnxruntime`: ONNX files on an execution provider chosen by `bench.onnx_providers` (first entry):
  `cpu` (default), `cuda` or `tensorrt` (the `gpu` extra: onnxruntime-gpu, and an NVIDIA GPU). The
  session's `backend` label names the provider: `onnxruntime`, `onnxruntime-cuda`, `onnxruntime-tensorrt`.
- `tensorrt`: engine artifacts (the `engine` stage), through TensorRT's runtime (the `tensorrt` extra).

GPU packages are imported when a session opens, never when this package is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from compress.errors import ConfigError

if TYPE_CHECKING:
    from compress.artifact import Artifact
    from compress.families.base import Adapter

BACKENDS = ("torch", "onnxruntime", "tensorrt")
DEFAULT_BACKEND = {"torch": "torch", "onnx": "onnxruntime", "engine": "tensorrt"}
FORMATS = {"torch": ("torch",), "onnxruntime": ("onnx",), "tensorrt": ("engine",)}  # what each backend runs
ONNX_PROVIDERS = ("cpu", "cuda", "tensorrt")
_EP = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}  # ONNX Runtime's names


class Session(Protocol):
    backend: str

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def require_onnx_providers(providers: Sequence[str]) -> None:
    """Fail before any work when an ONNX Runtime provider of `bench.onnx_providers` cannot run here.

    Raises ConfigError (unknown name), MissingDependencyError (this onnxruntime lacks the provider:
    install the `gpu` extra) or GpuUnavailableError (no NVIDIA GPU). `cpu` is always available.
    """
    unknown = [p for p in providers if p not in ONNX_PROVIDERS]
    if unknown:
        raise ConfigError(f"onnx_providers {unknown}; allowed: {', '.join(ONNX_PROVIDERS)}")
    gpu = [p for p in providers if p != "cpu"]
    if not gpu:
        return
    import onnxruntime as ort

    from compress.errors import MissingDependencyError
    from compress.gpu.availability import require_gpu

    available = ort.get_available_providers()
    missing = [_EP[p] for p in gpu if _EP[p] not in available]
    if missing:
        raise MissingDependencyError(
            "onnxruntime-gpu",
            extra="gpu",
            purpose=f"{', '.join(missing)} (this onnxruntime {ort.__version__} has {available}; uninstall "
            "onnxruntime first: the two wheels must not be installed together)",
        )
    require_gpu(f"onnxruntime {', '.join(_EP[p] for p in gpu)}")


def open_session(
    artifact: Artifact,
    adapter: Adapter,
    *,
    threads: int,
    backend: str | None = None,
    onnx_provider: str = "cpu",
) -> Session:
    """A session that runs `artifact` on `backend` (default: the natural one for its format).

    `onnx_provider` picks ONNX Runtime's execution provider for ONNX artifacts (see module doc).
    """
    backend = backend or DEFAULT_BACKEND.get(artifact.format)
    if artifact.format not in FORMATS.get(backend or "", ()):
        allowed = [b for b, formats in FORMATS.items() if artifact.format in formats]
        raise ValueError(f"no backend '{backend}' for a {artifact.format} artifact; allowed: {', '.join(allowed)}")
    if backend == "torch":
        from compress.backends.torch_backend import TorchSession

        return TorchSession(adapter.load_torch(artifact), list(adapter.io_spec().inputs), threads=threads)
    if backend == "onnxruntime":
        if onnx_provider == "cpu":
            from compress.backends.onnxruntime_backend import OrtSession

            return OrtSession(artifact.main, threads=threads)
        if onnx_provider not in ONNX_PROVIDERS:
            raise ValueError(f"onnx_provider = {onnx_provider!r}; allowed: {', '.join(ONNX_PROVIDERS)}")
        from compress.backends.onnxruntime_gpu_backend import OrtGpuSession

        return OrtGpuSession(
            artifact.main,
            provider=onnx_provider,
            threads=threads,
            int8=artifact.precision == "int8",
            engine_cache_dir=adapter.cache_dir / "tensorrt" / "ort-engines" / artifact.key[:16],
        )
    from compress.backends.tensorrt_backend import TensorRTSession

    return TensorRTSession(artifact.main)
