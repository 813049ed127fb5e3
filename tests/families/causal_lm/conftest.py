"""Fixtures: tiny random Llama decoders (tied and untied) and their ONNX exports."""

from __future__ import annotations

from pathlib import Path

import pytest
from llm_toys import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="session", params=[True, False], ids=["tied", "untied"])
def tiny_model(request):
    return tiny_llama(tie=request.param)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def exported(tiny_model, tmp_path_factory) -> tuple[object, Path]:
    from compress.families.causal_lm.export import export_decoder

    tie = "tied" if tiny_model.config.tie_word_embeddings else "untied"
    path = tmp_path_factory.mktemp(f"onnx-{tie}") / "decoder.onnx"
    export_decoder(tiny_model, path)
    return tiny_model, path


@pytest.fixture(scope="session")
def untied_onnx(tmp_path_factory) -> tuple[object, Path]:
    from compress.families.causal_lm.export import export_decoder

    model = tiny_llama(tie=False, seed=1)
    path = tmp_path_factory.mktemp("onnx-gen") / "decoder.onnx"
    export_decoder(model, path)
    return model, path
