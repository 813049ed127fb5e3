"""Every causal-lm session opens through `compress.backends`, once, with the artifact's session config."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from compress.artifact import Artifact
from compress.backends import _FACTORIES, ORT_SESSION_CONFIG, open_session
from compress.families.causal_lm.adapter import CausalLMAdapter
from compress.families.causal_lm.sessions import OrtCausalLM, TorchCausalLM

ENTRY = {"session.qdq_matmulnbits_accuracy_level": "0"}  # what the int4 TensorRT target sets


def _artifact(path: Path, fmt: str, info: dict | None = None) -> Artifact:
    return Artifact(
        name="x", path=path.parent, file=path.name, format=fmt, precision="fp32", stage="export", parent=None,
        key="0" * 64, info=info or {},
    )  # fmt: skip


def test_decoder_sessions_are_registered_for_both_backends() -> None:
    assert CausalLMAdapter.session_kind == "decoder"
    assert {b for k, b in _FACTORIES if k == "decoder"} == {"torch", "onnxruntime"}


def test_onnx_decoder_session_is_built_once_with_the_artifact_config(exported) -> None:
    model, path = exported
    adapter = types.SimpleNamespace(session_kind="decoder", load_torch=lambda art: model)
    session = open_session(_artifact(path, "onnx", {ORT_SESSION_CONFIG: ENTRY}), adapter, threads=1)
    assert isinstance(session, OrtCausalLM)
    options = session.session.get_session_options()
    assert options.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "0"
    assert options.intra_op_num_threads == 1
    plain = open_session(_artifact(path, "onnx"), adapter, threads=1)
    with pytest.raises(RuntimeError, match="does not have configuration"):  # no entry without the artifact's
        plain.session.get_session_options().get_session_config_entry("session.qdq_matmulnbits_accuracy_level")
    torch_session = open_session(_artifact(path, "torch"), adapter, threads=1)
    assert isinstance(torch_session, TorchCausalLM)
    ids = np.array([[5, 6, 7, 8]])
    np.testing.assert_allclose(torch_session.logits(ids), session.logits(ids), atol=1e-4)  # FP32 rounding only


def test_decoder_sessions_refuse_a_gpu_provider_and_an_engine(exported) -> None:
    _, path = exported
    adapter = types.SimpleNamespace(session_kind="decoder")
    with pytest.raises(ValueError, match="CPU provider only"):
        open_session(_artifact(path, "onnx"), adapter, threads=1, onnx_provider="cuda")
    with pytest.raises(ValueError, match="no decoder session on backend 'tensorrt'; registered: onnxruntime, torch"):
        open_session(_artifact(path, "engine"), adapter, threads=1)


def test_tensor_sessions_take_the_config_too(tmp_path) -> None:
    """The classifier / encoder path: the same one build, the same entries."""
    import torch

    path = tmp_path / "lin.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), str(path), input_names=["x"], dynamo=False)
    adapter = types.SimpleNamespace(io_spec=None)
    session = open_session(_artifact(path, "onnx", {ORT_SESSION_CONFIG: ENTRY}), adapter, threads=1)
    assert session.session.get_session_options().get_session_config_entry(next(iter(ENTRY))) == "0"
    assert session.run({"x": np.ones((1, 4), np.float32)})[0].shape == (1, 2)
