"""KV-cache ONNX export: I/O layout, parity with torch on prefill and decode, external data."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from compress.errors import StageError
from compress.families.causal_lm.export import check_parity, describe_io, export_decoder
from compress.families.causal_lm.sessions import OrtCausalLM

# FP32 through the same ops in a different runtime: differences are rounding only (~1e-6 seen on
# these logits of magnitude ~1); 1e-4 leaves room for summation order without hiding a wrong cache.
ATOL = 1e-4


def test_describe_io_names_and_dynamic_dims(exported):
    _, path = exported
    info = describe_io(path)
    names = [r["name"] for r in info["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:7] == [f"past_key_values.{i}.{kind}" for i in (0, 1) for kind in ("key", "value")]
    dims = {r["name"]: r["dims"] for r in info["inputs"] + info["outputs"]}
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert dims["present.0.key"] == ["batch", 2, "total_sequence", 16]
    assert dims["logits"] == ["batch", "sequence", 1000]
    layout = (info["num_layers"], info["num_kv_heads"], info["head_dim"], info["vocab_size"])
    assert layout == (2, 2, 16, 1000)


def test_parity_prefill_decode_and_16_greedy_tokens(exported):
    model, path = exported
    report = check_parity(model, OrtCausalLM(path), list(range(5, 17)), atol=ATOL, steps=16)
    assert report.prefill_max_abs <= ATOL and report.decode_max_abs <= ATOL
    assert len(report.onnx_tokens) == 16 and report.onnx_tokens == report.torch_tokens


def test_batched_padded_prefill_matches_torch(exported):
    """Left padding: the real positions of a padded row equal torch on the unpadded row."""
    model, path = exported
    lm = OrtCausalLM(path)
    ids = np.array([[0, 0, 7, 8, 9], [3, 4, 5, 6, 7]], dtype=np.int64)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=np.int64)
    logits, _ = lm.prefill(ids, mask)
    with torch.no_grad():
        ref0 = model(input_ids=torch.tensor([[7, 8, 9]])).logits.numpy()[0]
        ref1 = model(input_ids=torch.tensor(ids[1:])).logits.numpy()[0]
    np.testing.assert_allclose(logits[0, 2:], ref0, atol=ATOL)
    np.testing.assert_allclose(logits[1], ref1, atol=ATOL)


def test_parity_failure_raises_stage_error(exported):
    model, path = exported
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)
    with pytest.raises(StageError, match="parity failed"):
        check_parity(other, OrtCausalLM(path), [5, 6, 7], atol=ATOL, steps=2)
    report = check_parity(other, OrtCausalLM(path), [5, 6, 7], atol=ATOL, steps=2, raise_on_failure=False)
    assert not report.ok and report.prefill_max_abs > ATOL


def test_external_data_round_trip(tmp_path, exported):
    model, path = exported
    out = export_decoder(model, tmp_path / "ext.onnx", external_data=True)
    data = tmp_path / "ext.onnx.data"
    assert data.is_file() and data.stat().st_size > out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]  # no temp left
    ids = np.array([[5, 6, 7, 8]], dtype=np.int64)
    np.testing.assert_allclose(OrtCausalLM(out).logits(ids), OrtCausalLM(path).logits(ids), atol=1e-6)


def test_tied_embedding_stored_once(exported):
    import onnx

    model, path = exported
    big = [t for t in onnx.load(str(path)).graph.initializer if 1000 in t.dims]
    # Tied: one (64, 1000) matrix serves the Gather and the lm_head; untied: embedding + lm_head.
    assert len(big) == (1 if model.config.tie_word_embeddings else 2)


@pytest.mark.slow
def test_dynamo_exporter_parity(tmp_path):
    """The dynamo exporter (opset 18, ~10 s) gives the same I/O and passes the same parity check."""
    from llm_toys import tiny_llama

    model = tiny_llama(tie=True)
    path = export_decoder(model, tmp_path / "dyn.onnx", dynamo=True, opset=18)
    report = check_parity(model, OrtCausalLM(path), list(range(5, 17)), atol=ATOL, steps=16)
    assert report.tokens_match
    assert describe_io(path)["num_layers"] == 2
