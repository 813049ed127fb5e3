"""INT4 export (onnxruntime-cpu) of a tied decoder: the embedding gather reads the lm_head's codes, stored once.

The int4 stage unties the table before export (`_untie_for_export`) and hands the head's QuantizedWeight
as the embedding's; the rewrite then reuses the head's MatMulNBits tensors instead of writing the codes
a second time. Checked on the tiny Llama: one copy of the vocab-sized codes, logits = torch with the
dequantized weights (float compute).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llm_toys import VOCAB, tiny_llama  # noqa: E402

from compress.families.causal_lm.export import export_decoder  # noqa: E402
from compress.families.causal_lm.sessions import OrtCausalLM  # noqa: E402
from compress.quant.algorithms.rtn import rtn_quantize_model  # noqa: E402
from compress.quant.primitives.weight import WeightQuantConfig  # noqa: E402
from compress.quant.targets.onnx_rewrite import float_weights_of, rewrite_onnx_file  # noqa: E402

IDS = np.random.default_rng(1).integers(0, VOCAB, size=(2, 20))


@pytest.mark.parametrize("head_bits", [4, 8])
def test_tied_table_once_in_int4_file(tmp_path, head_bits):
    model = tiny_llama(tie=True, seed=5)
    hidden = model.config.hidden_size
    body = WeightQuantConfig(bits=4, group_size=32)
    qws = rtn_quantize_model(model, config=body)  # decoder Linears (the lm_head is not in the default filter)
    head_only = lambda name, module: name == "lm_head"  # noqa: E731
    qws.update(
        rtn_quantize_model(model, config=WeightQuantConfig(bits=head_bits, group_size=32), layers_filter=head_only)
    )
    with torch.no_grad():  # as the stage's _untie_for_export: the Gather gets a (V, H) table of its own
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        model.config.tie_word_embeddings = False
    src = tmp_path / "fp.onnx"
    export_decoder(model, src)
    weights = float_weights_of(model, [*qws, "model.embed_tokens"])
    out = tmp_path / "q.onnx"
    rewrite_onnx_file(src, out, qws, weights, embeddings={"model.embed_tokens": qws["lm_head"]})
    proto = onnx.load(str(out))
    vocab_rows = [t for t in proto.graph.initializer if t.dims and t.dims[0] == VOCAB]
    code_bytes = VOCAB * hidden * head_bits // 8
    assert sum(len(t.raw_data) for t in vocab_rows if t.data_type == onnx.TensorProto.UINT8) <= (
        code_bytes + VOCAB * 2 * (head_bits // 4)  # the codes once (+ the zero points, 1 per group)
    )
    assert not [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and VOCAB in t.dims]
    gathers = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 1 and {a.name: a.i for a in gathers[0].attribute}["bits"] == head_bits
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(qws["lm_head"].dequantize())
        ref = model(torch.from_numpy(IDS)).logits.numpy()
    got = OrtCausalLM(out).logits(IDS)
    # weights equal, float compute (no accuracy_level): ~1e-6 seen; 1e-4 fails on any code/scale slip
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
