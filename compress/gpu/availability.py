"""Is there a CUDA GPU, and the package a GPU path needs? Used to fail fast and to skip GPU tests.

Probing order (cheap first, nothing heavy imported): the package's presence via `importlib.util.find_spec`
(no import), then `nvidia-smi -L` (ships with the NVIDIA driver; lists GPUs without a CUDA context).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from dataclasses import dataclass
from typing import Literal

from compress.errors import MissingDependencyError, StageError

Need = Literal["gpu", "tensorrt", "onnxruntime-gpu"]


class GpuUnavailableError(StageError):
    """A GPU-only step was asked for on a machine without a usable NVIDIA GPU."""


@dataclass(frozen=True)
class GpuStatus:
    """`available` is True when the need can be met here; `reason` says why not (or what was found)."""

    available: bool
    reason: str


def _nvidia_gpus() -> tuple[list[str], str]:
    """GPU names from `nvidia-smi -L`, or ([], why none)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return [], "no NVIDIA driver: nvidia-smi is not on PATH"
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [], f"nvidia-smi failed: {e}"
    gpus = [line.strip() for line in out.stdout.splitlines() if line.startswith("GPU ")]
    if out.returncode != 0 or not gpus:
        detail = (out.stderr or out.stdout).strip().splitlines()
        return [], f"nvidia-smi lists no GPU ({detail[0] if detail else f'exit {out.returncode}'})"
    return gpus, ""


def _ort_gpu_providers() -> tuple[set[str], str]:
    if importlib.util.find_spec("onnxruntime") is None:
        return set(), "onnxruntime is not installed"
    import onnxruntime as ort

    providers = set(ort.get_available_providers())
    gpu = providers & {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
    if not gpu:
        return set(), (
            f"onnxruntime {ort.__version__} has no CUDA/TensorRT execution provider "
            f"(has {sorted(providers)}); install onnxruntime-gpu"
        )
    return gpu, ""


def gpu_status(need: Need = "gpu") -> GpuStatus:
    """Whether `need` ('gpu', 'tensorrt' or 'onnxruntime-gpu') is met on this machine, and why not."""
    if need == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        return GpuStatus(False, "the 'tensorrt' package is not installed (pip install 'compress[tensorrt]')")
    if need == "onnxruntime-gpu":
        found, why = _ort_gpu_providers()
        if not found:
            return GpuStatus(False, why)
    gpus, why = _nvidia_gpus()
    if not gpus:
        return GpuStatus(False, why)
    return GpuStatus(True, "; ".join(gpus))


def require_gpu(purpose: str) -> None:
    """Raise GpuUnavailableError (with the probe's reason) when there is no NVIDIA GPU."""
    status = gpu_status("gpu")
    if not status.available:
        raise GpuUnavailableError(f"{purpose} needs an NVIDIA GPU with CUDA, but {status.reason}")


def import_tensorrt(purpose: str):  # noqa: ANN201 - returns the tensorrt module
    """`import tensorrt`, or MissingDependencyError naming the extra that installs it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MissingDependencyError("tensorrt", extra="tensorrt", purpose=purpose) from e
    return trt
