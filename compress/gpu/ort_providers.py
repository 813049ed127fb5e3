"""ONNX Runtime sessions on the CUDA or TensorRT execution provider, failing fast when unavailable.

Provider option names are ONNX Runtime's documented ones (onnxruntime.ai, "CUDA Execution Provider"
and "TensorRT Execution Provider" pages): device_id; trt_fp16_enable, trt_int8_enable,
trt_engine_cache_enable, trt_engine_cache_path, trt_timing_cache_enable, trt_max_workspace_size,
trt_profile_{min,opt,max}_shapes. ONNX Runtime silently falls back to the CPU provider when a GPU
provider fails to load; `make_gpu_session` checks the session's providers and raises instead, so a
benchmark never reports CPU numbers under a GPU label.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from compress.errors import ConfigError, MissingDependencyError, StageError
from compress.gpu.availability import require_gpu
from compress.gpu.profiles import Profile

Provider = Literal["cuda", "tensorrt"]
_EP = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def provider_config(
    provider: Provider,
    *,
    device_id: int = 0,
    fp16: bool = False,
    int8: bool = False,
    engine_cache_dir: str | os.PathLike[str] | None = None,
    workspace_mb: int | None = None,
    profile: Profile | None = None,
    extra_options: Mapping[str, object] | None = None,
) -> list[tuple[str, dict[str, str]]]:
    """The `providers=` list for InferenceSession: the requested GPU provider first, then CUDA (for
    nodes TensorRT does not take) and CPU. Pure; option values are strings as ONNX Runtime expects."""
    if provider not in _EP:
        raise ConfigError(f"provider = {provider!r}; allowed: {', '.join(_EP)}")
    if provider == "cuda" and (fp16 or int8 or engine_cache_dir or profile):
        raise ConfigError(
            "fp16/int8/engine_cache_dir/profile are TensorRT EP options; the CUDA EP runs the graph's "
            "own types (export fp16 or quantize for lower precision)"
        )
    cuda_opts = {"device_id": str(device_id)}
    if provider == "cuda":
        opts = dict(cuda_opts)
    else:
        opts = {"device_id": str(device_id), "trt_fp16_enable": _b(fp16), "trt_int8_enable": _b(int8)}
        if engine_cache_dir is not None:
            cache = str(Path(engine_cache_dir))
            opts |= {
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": cache,
            }
        if workspace_mb is not None:
            opts["trt_max_workspace_size"] = str(int(workspace_mb) * (1 << 20))
        if profile is not None:
            opts |= profile.ort_tensorrt_options()
    opts |= {k: str(v) for k, v in (extra_options or {}).items()}
    chain = [(_EP[provider], opts)]
    if provider == "tensorrt":
        chain.append(("CUDAExecutionProvider", cuda_opts))
    chain.append(("CPUExecutionProvider", {}))
    return chain


def _b(flag: bool) -> str:
    return "True" if flag else "False"


def make_gpu_session(
    onnx_path: str | os.PathLike[str],
    provider: Provider,
    *,
    session_options: object | None = None,
    **options: object,
):  # noqa: ANN201 - onnxruntime.InferenceSession
    """InferenceSession whose first provider is the requested GPU provider, or a clear error.

    `options` are those of `provider_config`. Raises MissingDependencyError when the installed
    onnxruntime has no such provider (CPU wheel), GpuUnavailableError with no GPU, StageError when the
    provider was listed but ONNX Runtime fell back to another.
    """
    chain = provider_config(provider, **options)  # type: ignore[arg-type]
    import onnxruntime as ort

    wanted = chain[0][0]
    if wanted not in ort.get_available_providers():
        raise MissingDependencyError(
            "onnxruntime-gpu",
            extra="gpu",
            purpose=f"{wanted} (this onnxruntime {ort.__version__} has {ort.get_available_providers()})",
        )
    require_gpu(f"onnxruntime {wanted}")
    sess = ort.InferenceSession(str(onnx_path), sess_options=session_options, providers=chain)
    active = sess.get_providers()
    if not active or active[0] != wanted:
        raise StageError(
            f"onnxruntime did not enable {wanted} for {onnx_path} (active: {active}); its log above says "
            "why (CUDA/cuDNN/TensorRT libraries not found or version mismatch)"
        )
    return sess
