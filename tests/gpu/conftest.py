"""Tiny ONNX files for the GPU-layer tests, and a fake `nvidia-smi` to exercise the probes on CPU."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def conv_model(*, batch: str | int = "batch", opset: int = 17) -> onnx.ModelProto:
    """x (batch, 3, 8, 8) -> Conv(4) -> Relu -> y."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 8, 8])
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", opset)]
    )
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def decoder_inputs_model() -> onnx.ModelProto:
    """input_ids/attention_mask (batch, sequence) int64 -> logits (batch, sequence, 16): the input
    signature of an exported causal LM, with a trivial body."""
    emb = numpy_helper.from_array(np.zeros((32, 16), np.float32), "emb")
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
        helper.make_node("Cast", ["attention_mask"], ["m"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m3"], name="unsq"),
        helper.make_node("Mul", ["h", "m3"], ["logits"], name="mul"),
    ]
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", 16])
    graph = helper.make_graph(nodes, "lm", [ids, mask], [out], [emb, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def conv_onnx(tmp_path: Path) -> Path:
    path = tmp_path / "conv.onnx"
    onnx.save(conv_model(), str(path))
    return path


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Put an `nvidia-smi` script first on PATH; returns a function that sets what it prints."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"

    def install(list_output: str, query_output: str = "", returncode: int = 0) -> Path:
        (bin_dir / "list.txt").write_text(list_output + "\n")
        (bin_dir / "query.txt").write_text(query_output + "\n")
        script.write_text(
            "#!/bin/sh\n"
            'case "$*" in\n'
            f"  *--query-gpu*) cat '{bin_dir}/query.txt' ;;\n"
            f"  *) cat '{bin_dir}/list.txt' ;;\n"
            "esac\n"
            f"exit {returncode}\n"
        )
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
        return script

    return install
