"""GPU deployment: TensorRT engine build/run and ONNX Runtime GPU sessions.

Every module imports `tensorrt`, `onnxruntime` GPU providers and CUDA bindings lazily, inside functions,
so `import compress.gpu` works on CPU-only machines; calls raise MissingDependencyError (package absent)
or GpuUnavailableError (no CUDA GPU) with what to do.
"""

from compress.gpu.availability import GpuStatus, GpuUnavailableError, gpu_status
from compress.gpu.profiles import Profile, ShapeRange, derive_profile, derive_profiles

__all__ = [
    "GpuStatus",
    "GpuUnavailableError",
    "Profile",
    "ShapeRange",
    "derive_profile",
    "derive_profiles",
    "gpu_status",
]
