"""Backends run artifacts: the evaluator and the benchmark both go through them, so the number a gate
checks is the number of the file that ships.

- `torch`: torch checkpoints, eager, CPU.
- `onnxruntime`: ONNX files on an execution provider chosen by `bench.onnx_providers` (first entry):
  `cpu` (default), `cuda` or `tensorrt` (the `gpu` extra: onnxruntime-gpu, and an NVIDIA GPU). The
  session's `backend` label names the provider: `onnxruntime`, `onnxruntime-cuda`, `onnxruntime-tensorrt`.
- `tensorrt`: engine artifacts (the `engine` stage), through TensorRT's runtime (the `tensorrt` extra).

One protocol per kind of model (`Adapter.session_kind`): `Session` (`run(inputs)`: classifiers,
encoders; the sessions of this package) and `DecoderSession` (`logits`, `prefill` / `decode`,
`continue_greedy`: decoder LLMs), whose classes the family registers here with `register_session`.
ONNX Runtime sessions are built once, with the session config entries the artifact asks for
(`info["ort_session_config"]`).

GPU packages are imported when a session opens, never when this package is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

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


#: `Artifact.info` key: ONNX Runtime session config entries a stage asks every session of the artifact to set,
#: e.g. `{"session.qdq_matmulnbits_accuracy_level": "0"}` for INT4 Q/DQ graphs meant for TensorRT (without
#: it ONNX Runtime fuses DequantizeLinear+MatMul into MatMulNBits with int8 activations).
ORT_SESSION_CONFIG = "ort_session_config"


class Session(Protocol):
    """Kind "tensors": named input arrays in, output arrays out (classifiers, encoders)."""

    backend: str

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class DecoderSession(Protocol):
    """Kind "decoder": a causal LM with a KV cache. `state` is the backend's own cache object."""

    backend: str

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """(B, T) unpadded ids -> (B, T, V) logits, no cache."""

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *, last_only: bool = False
    ) -> tuple[np.ndarray, Any]:
        """Run a prompt batch on an empty cache: logits (B, T, V) or (B, 1, V), and the cache."""

    def decode(self, input_ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        """Append (B, T) ids to the cache: logits (B, T, V) and the new cache."""

    def continue_greedy(self, prompt: list[int], n: int) -> list[int]:
        """`n` greedy tokens after `prompt` (no stop tokens)."""


#: (kind, backend) -> factory(artifact, adapter, *, threads, onnx_provider, session_config); filled by the
#: families' session modules (`compress.families.causal_lm.sessions`), imported by their adapters
SessionFactory = Callable[..., Any]
_FACTORIES: dict[tuple[str, str], SessionFactory] = {}


def register_session(kind: str, backend: str) -> Callable[[SessionFactory], SessionFactory]:
    """Register the factory of `kind` sessions on `backend` (a family's sessions; "tensors" is built in)."""
    if backend not in BACKENDS:
        raise ValueError(f"register_session: backend {backend!r}; allowed: {', '.join(BACKENDS)}")

    def wrap(factory: SessionFactory) -> SessionFactory:
        if (kind, backend) in _FACTORIES:
            raise RuntimeError(f"{kind} session on {backend} registered twice")
        _FACTORIES[kind, backend] = factory
        return factory

    return wrap


def ort_session_config(artifact: Artifact) -> dict[str, str]:
    """The ONNX Runtime session entries an ONNX artifact asks for (empty for other formats)."""
    if artifact.format != "onnx":
        return {}
    return {str(k): str(v) for k, v in (artifact.info or {}).get(ORT_SESSION_CONFIG, {}).items()}


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
) -> Session | DecoderSession:
    """A session of the adapter's kind (`adapter.session_kind`) that runs `artifact` on `backend` (default:
    the natural one for its format).

    `onnx_provider` picks ONNX Runtime's execution provider for ONNX artifacts (see module doc).
    """
    backend = backend or DEFAULT_BACKEND.get(artifact.format)
    if artifact.format not in FORMATS.get(backend or "", ()):
        allowed = [b for b, formats in FORMATS.items() if artifact.format in formats]
        raise ValueError(f"no backend '{backend}' for a {artifact.format} artifact; allowed: {', '.join(allowed)}")
    kind = getattr(adapter, "session_kind", "tensors")
    config = ort_session_config(artifact)
    if kind != "tensors":
        factory = _FACTORIES.get((kind, backend or ""))
        if factory is None:
            have = sorted(b for k, b in _FACTORIES if k == kind)
            raise ValueError(f"no {kind} session on backend '{backend}'; registered: {', '.join(have) or 'none'}")
        return factory(artifact, adapter, threads=threads, onnx_provider=onnx_provider, session_config=config)
    return _tensor_session(artifact, adapter, backend, threads=threads, onnx_provider=onnx_provider, config=config)


def _tensor_session(
    artifact: Artifact,
    adapter: Adapter,
    backend: str | None,
    *,
    threads: int,
    onnx_provider: str,
    config: Mapping[str, str],
) -> Session:
    if backend == "torch":
        from compress.backends.torch_backend import TorchSession

        return TorchSession(adapter.load_torch(artifact), list(adapter.io_spec().inputs), threads=threads)
    if backend == "onnxruntime":
        if onnx_provider == "cpu":
            from compress.backends.onnxruntime_backend import OrtSession

            return OrtSession(artifact.main, threads=threads, session_config=config)
        if onnx_provider not in ONNX_PROVIDERS:
            raise ValueError(f"onnx_provider = {onnx_provider!r}; allowed: {', '.join(ONNX_PROVIDERS)}")
        from compress.backends.onnxruntime_gpu_backend import OrtGpuSession

        return OrtGpuSession(
            artifact.main,
            provider=onnx_provider,
            threads=threads,
            session_config=config,
            int8=artifact.precision == "int8",
            engine_cache_dir=adapter.cache_dir / "tensorrt" / "ort-engines" / artifact.key[:16],
        )
    from compress.backends.tensorrt_backend import TensorRTSession

    return TensorRTSession(artifact.main)
