"""Backends for engines and ONNX Runtime GPU providers: on a CPU machine they fail when opened, with the
install hint, and importing them pulls in no GPU package."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import onnx
import pytest
from pydantic import ValidationError

from compress.artifact import Artifact
from compress.backends import open_session, require_onnx_providers
from compress.config import BenchOptions
from compress.errors import ConfigError, MissingDependencyError
from compress.gpu.availability import gpu_status

from .conftest import conv_model

ORT_GPU = gpu_status("onnxruntime-gpu")
TRT = gpu_status("tensorrt")


def _artifact(folder: Path, fmt: str, file: str) -> Artifact:
    return Artifact(
        name="a", path=folder, file=file, format=fmt, precision="fp32", stage="x", parent=None, key="0" * 64
    )


def test_bench_options_providers() -> None:
    assert BenchOptions().onnx_providers == ("cpu",)
    assert BenchOptions(onnx_providers=["cuda", "cpu"]).onnx_providers == ("cuda", "cpu")
    for bad in (["rocm"], []):
        with pytest.raises(ValidationError):
            BenchOptions(onnx_providers=bad)


@pytest.mark.skipif(ORT_GPU.available, reason="onnxruntime-gpu and a GPU are present")
def test_gpu_provider_needs_onnxruntime_gpu(tmp_path) -> None:
    require_onnx_providers(("cpu",))  # always available
    with pytest.raises(ConfigError, match="rocm"):
        require_onnx_providers(("rocm",))
    with pytest.raises(MissingDependencyError, match=r"pip install 'compress\[gpu\]'") as info:
        require_onnx_providers(("cpu", "cuda"))
    assert "CUDAExecutionProvider" in str(info.value) and "uninstall onnxruntime" in str(info.value)
    onnx.save(conv_model(), str(tmp_path / "m.onnx"))
    art = _artifact(tmp_path, "onnx", "m.onnx")
    adapter = types.SimpleNamespace(cache_dir=tmp_path / "cache")
    assert open_session(art, adapter, threads=1).backend == "onnxruntime"  # cpu stays the default
    for provider in ("cuda", "tensorrt"):
        with pytest.raises(MissingDependencyError, match="onnxruntime-gpu"):
            open_session(art, adapter, threads=1, onnx_provider=provider)


@pytest.mark.skipif(TRT.available, reason="tensorrt and a GPU are present")
def test_engine_artifact_opens_the_tensorrt_backend(tmp_path) -> None:
    (tmp_path / "model.engine").write_bytes(b"not an engine")
    art = _artifact(tmp_path, "engine", "model.engine")
    with pytest.raises(MissingDependencyError, match=r"pip install 'compress\[tensorrt\]'"):
        open_session(art, types.SimpleNamespace(cache_dir=tmp_path), threads=1)
    with pytest.raises(ValueError, match="no backend 'torch' for a engine artifact; allowed: tensorrt"):
        open_session(art, types.SimpleNamespace(cache_dir=tmp_path), threads=1, backend="torch")


def test_imports_stay_light() -> None:
    """The backends package and the engine stage import no GPU package, nor onnxruntime, until used."""
    code = (
        "import sys, compress.backends, compress.stages.engine, compress.runner;"
        "print(sorted(m for m in ('tensorrt', 'onnxruntime', 'pycuda', 'cuda') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
