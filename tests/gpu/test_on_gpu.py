"""Real TensorRT / ONNX Runtime GPU runs; skipped (with the probe's reason) where there is no GPU."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from compress.gpu.availability import gpu_status
from compress.gpu.profiles import derive_profile

TRT = gpu_status("tensorrt")
ORT_GPU = gpu_status("onnxruntime-gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not TRT.available, reason=f"TensorRT GPU test: {TRT.reason}")
def test_fp16_engine_matches_onnxruntime_cpu(conv_onnx, tmp_path):
    """fp16 engine vs fp32 ONNX Runtime CPU: |diff| <= 2e-2 (fp16 keeps ~3 decimal digits; the conv sums
    27 products of values ~1), and the timing cache is written and reused."""
    from compress.gpu.tensorrt_build import build_engine
    from compress.gpu.tensorrt_runtime import TensorRTRunner

    profile = derive_profile(conv_onnx, {"batch": (1, 4, 8)})
    cache = tmp_path / "timing.cache"
    info = build_engine(conv_onnx, tmp_path / "m.engine", precision="fp16", profiles=[profile], timing_cache_path=cache)
    assert info.engine_bytes > 0 and cache.stat().st_size > 0 and info.compute_capability != "unknown"
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(conv_onnx), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    runner = TensorRTRunner(info.engine_path)
    out = runner.run({"x": x})["y"].astype(np.float32)
    np.testing.assert_allclose(out, ref, atol=2e-2, rtol=0)
    timing = runner.time({"x": x}, warmup=2, iterations=5)
    assert len(timing.latencies_ms) == 5 and timing.median_ms > 0


@pytest.mark.gpu
@pytest.mark.skipif(not ORT_GPU.available, reason=f"onnxruntime-gpu test: {ORT_GPU.reason}")
def test_cuda_session_matches_cpu(conv_onnx):
    """CUDA EP vs CPU EP at fp32: within 1e-4 (same math, different kernel order)."""
    from compress.gpu.ort_providers import make_gpu_session

    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(conv_onnx), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    out = make_gpu_session(conv_onnx, "cuda").run(None, {"x": x})[0]
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
