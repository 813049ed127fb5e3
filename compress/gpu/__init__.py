"""GPU deployment: TensorRT engine build/run and ONNX Runtime GPU sessions.

Every module imports `tensorrt`, `onnxruntime` GPU providers and CUDA bindings lazily, inside functions,
so `import compress.gpu` works on CPU-only machines; calls raise MissingDependencyError (package absent)
or GpuUnavailableError (no CUDA GPU) with what to do. The names below resolve on first use (PEP 562), so
importing `compress.gpu.availability` (the runner does) does not import `onnx`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compress.gpu.availability import GpuStatus, GpuUnavailableError, gpu_status
    from compress.gpu.profiles import Profile, ShapeRange, derive_profile, derive_profiles

_WHERE = {
    "GpuStatus": "availability",
    "GpuUnavailableError": "availability",
    "gpu_status": "availability",
    "Profile": "profiles",
    "ShapeRange": "profiles",
    "derive_profile": "profiles",
    "derive_profiles": "profiles",
}

__all__ = [
    "GpuStatus",
    "GpuUnavailableError",
    "Profile",
    "ShapeRange",
    "derive_profile",
    "derive_profiles",
    "gpu_status",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'compress.gpu' has no attribute {name!r}")
    return getattr(import_module(f"compress.gpu.{_WHERE[name]}"), name)
