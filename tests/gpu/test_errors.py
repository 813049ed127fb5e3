"""Missing-package and no-GPU errors, GPU probes with a fake nvidia-smi, and the pure build/run helpers."""

from __future__ import annotations

import sys
import types

import onnx
import onnxruntime as ort
import pytest

from compress.errors import ConfigError, MissingDependencyError, StageError
from compress.gpu import availability, ort_providers, tensorrt_build, tensorrt_runtime
from compress.gpu.availability import GpuUnavailableError, gpu_status
from compress.gpu.profiles import derive_profile

from .conftest import conv_model


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(availability.shutil, "which", lambda name: None)


@pytest.fixture
def fake_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))


# ---- probes --------------------------------------------------------------------------------------


def test_status_without_driver(no_gpu):
    status = gpu_status()
    assert not status.available
    assert "nvidia-smi" in status.reason


def test_status_with_a_listed_gpu(fake_nvidia_smi):
    fake_nvidia_smi("GPU 0: NVIDIA A10G (UUID: GPU-1234)")
    status = gpu_status()
    assert status.available and "A10G" in status.reason


def test_status_when_driver_lists_nothing(fake_nvidia_smi):
    fake_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver", returncode=9)
    status = gpu_status()
    assert not status.available and "couldn't communicate" in status.reason


def test_status_for_missing_tensorrt(no_tensorrt, monkeypatch):
    monkeypatch.setattr(availability.importlib.util, "find_spec", lambda name: None)
    status = gpu_status("tensorrt")
    assert not status.available and "compress[tensorrt]" in status.reason


def test_status_for_cpu_onnxruntime(fake_nvidia_smi, monkeypatch):
    fake_nvidia_smi("GPU 0: NVIDIA A10G (UUID: GPU-1234)")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    status = gpu_status("onnxruntime-gpu")
    assert not status.available and "onnxruntime-gpu" in status.reason


def test_gpu_name_and_capability_from_nvidia_smi(fake_nvidia_smi, monkeypatch):
    fake_nvidia_smi("GPU 0: NVIDIA L4 (UUID: x)", query_output="NVIDIA L4, 8.9")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tensorrt_build.gpu_name_and_capability() == ("NVIDIA L4", "8.9")


# ---- build_engine ------------------------------------------------------------------------------


def test_build_without_tensorrt_package(conv_onnx, tmp_path, no_tensorrt):
    with pytest.raises(MissingDependencyError) as info:
        tensorrt_build.build_engine(
            conv_onnx,
            tmp_path / "m.engine",
            precision="fp16",
            profiles=[derive_profile(conv_onnx, {"batch": (1, 2, 4)})],
        )
    assert "'tensorrt'" in str(info.value) and "compress[tensorrt]" in str(info.value)


def test_build_without_gpu(conv_onnx, tmp_path, fake_tensorrt, no_gpu):
    with pytest.raises(GpuUnavailableError, match="nvidia-smi"):
        tensorrt_build.build_engine(conv_onnx, tmp_path / "m.engine", precision="fp32")
    assert not (tmp_path / "m.engine").exists()


def test_build_refuses_int8_of_a_float_graph(conv_onnx, tmp_path, no_tensorrt):
    # refused before tensorrt is even imported: the graph contradicts the precision
    with pytest.raises(StageError, match="no Q/DQ nodes"):
        tensorrt_build.build_engine(conv_onnx, tmp_path / "m.engine", precision="int8")
    with pytest.raises(StageError, match="no INT4 DequantizeLinear"):
        tensorrt_build.build_engine(conv_onnx, tmp_path / "m.engine", precision="int4")


def test_build_refuses_a_graph_tensorrt_rejects(tmp_path, no_tensorrt):
    path = tmp_path / "old.onnx"
    onnx.save(conv_model(opset=13), str(path))
    with pytest.raises(StageError, match=r"\[opset\]"):
        tensorrt_build.build_engine(path, tmp_path / "m.engine", precision="fp16")


@pytest.mark.parametrize("kwargs", [{"precision": "int3"}, {"precision": "fp16", "workspace_mb": 0}])
def test_build_argument_errors(conv_onnx, tmp_path, kwargs):
    with pytest.raises(ConfigError):
        tensorrt_build.build_engine(conv_onnx, tmp_path / "m.engine", **kwargs)


def test_plans():
    assert tensorrt_build.plan_build("int8").strongly_typed and not tensorrt_build.plan_build("int8").fp16_flag
    assert tensorrt_build.plan_build("int4").strongly_typed
    fp16 = tensorrt_build.plan_build("fp16")
    assert fp16.fp16_flag and not fp16.strongly_typed
    fp32 = tensorrt_build.plan_build("fp32")
    assert not fp32.fp16_flag and not fp32.strongly_typed


def test_parser_errors_name_the_node():
    text = tensorrt_build.format_parser_errors(
        "m.onnx",
        [
            tensorrt_build.ParserErrorInfo(3, "/c1/Conv", "Conv", "ErrorCode.UNSUPPORTED_NODE", "bad weights"),
            tensorrt_build.ParserErrorInfo(-1, "", "", "ErrorCode.INVALID_GRAPH", "no outputs"),
        ],
    )
    assert "2 error(s)" in text
    assert "node #3 '/c1/Conv' (Conv) [ErrorCode.UNSUPPORTED_NODE]: bad weights" in text
    assert "graph [ErrorCode.INVALID_GRAPH]: no outputs" in text


# ---- runtime -----------------------------------------------------------------------------------


def test_runner_without_tensorrt_package(tmp_path, no_tensorrt):
    with pytest.raises(MissingDependencyError, match="compress\\[tensorrt\\]"):
        tensorrt_runtime.TensorRTRunner(tmp_path / "m.engine")


def test_runner_without_gpu(tmp_path, fake_tensorrt, no_gpu):
    with pytest.raises(GpuUnavailableError):
        tensorrt_runtime.TensorRTRunner(tmp_path / "m.engine")


def test_runtime_pure_helpers():
    with pytest.raises(ConfigError, match=r"missing \['mask'\], unexpected \['x'\]"):
        tensorrt_runtime.match_inputs(["ids", "mask"], {"ids": 1, "x": 2})
    assert tensorrt_runtime.torch_dtype_name("HALF") == "float16"
    with pytest.raises(StageError, match="FP8"):
        tensorrt_runtime.torch_dtype_name("FP8")


# ---- onnxruntime GPU providers -------------------------------------------------------------------


def test_provider_chain_for_tensorrt(tmp_path):
    profile = derive_profile(conv_model(), {"batch": (1, 4, 8)})
    chain = ort_providers.provider_config(
        "tensorrt", fp16=True, engine_cache_dir=tmp_path / "cache", workspace_mb=512, profile=profile
    )
    assert [name for name, _ in chain] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    opts = chain[0][1]
    assert opts["trt_fp16_enable"] == "True" and opts["trt_int8_enable"] == "False"
    assert opts["trt_engine_cache_enable"] == "True" and opts["trt_engine_cache_path"] == str(tmp_path / "cache")
    assert opts["trt_max_workspace_size"] == str(512 * 2**20)
    assert opts["trt_profile_max_shapes"] == "x:8x3x8x8"


def test_provider_chain_for_cuda_rejects_trt_options():
    assert ort_providers.provider_config("cuda", device_id=1)[0] == (
        "CUDAExecutionProvider",
        {"device_id": "1"},
    )
    with pytest.raises(ConfigError, match="TensorRT EP options"):
        ort_providers.provider_config("cuda", fp16=True)
    with pytest.raises(ConfigError, match="allowed: cuda, tensorrt"):
        ort_providers.provider_config("rocm")  # type: ignore[arg-type]


def test_session_with_cpu_onnxruntime(conv_onnx, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(MissingDependencyError) as info:
        ort_providers.make_gpu_session(conv_onnx, "cuda")
    assert "onnxruntime-gpu" in str(info.value) and "compress[gpu]" in str(info.value)


def test_session_without_gpu(conv_onnx, monkeypatch, no_gpu):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(GpuUnavailableError, match="CUDAExecutionProvider"):
        ort_providers.make_gpu_session(conv_onnx, "cuda")


def test_session_fallback_is_an_error(conv_onnx, monkeypatch, fake_nvidia_smi):
    """ONNX Runtime falls back to CPU when the CUDA EP cannot load; that must not pass silently."""
    fake_nvidia_smi("GPU 0: NVIDIA A10G (UUID: GPU-1234)")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    real = ort.InferenceSession

    def cpu_session(path, sess_options=None, providers=None):
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", cpu_session)
    with pytest.raises(StageError, match="did not enable CUDAExecutionProvider"):
        ort_providers.make_gpu_session(conv_onnx, "cuda")
