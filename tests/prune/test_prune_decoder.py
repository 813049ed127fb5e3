"""Our own structured pruning of decoders, on a Llama: GQA-aware heads, MLP width, config round-trip."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from compress.prune import PruneOptions, planned_sizes, prune_decoder

transformers = pytest.importorskip("transformers")

HEADS, KV, HEAD_DIM, INTER = 4, 2, 16, 128


def _tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        intermediate_size=INTER,
        vocab_size=1000,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _kill_query_head(model: torch.nn.Module, layer: int, head: int) -> None:
    attn = model.model.layers[layer].self_attn
    rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    with torch.no_grad():
        attn.q_proj.weight[rows] = 0.0
        attn.o_proj.weight[:, rows] = 0.0  # the head now contributes nothing to the output


def _kill_mlp_channels(model: torch.nn.Module, layer: int, channels: list[int]) -> None:
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[channels] = 0.0
        mlp.up_proj.weight[channels] = 0.0
        mlp.down_proj.weight[:, channels] = 0.0


def test_removing_dead_query_heads_and_channels_keeps_logits_exactly() -> None:
    # Heads 1 (KV group 0) and 2 (KV group 1) are dead in layer 0; heads 0 and 3 in layer 1. Removing one
    # query head per group re-indexes the rest: a wrong query->KV mapping would change the logits.
    model = _tiny_llama()
    _kill_query_head(model, 0, 1)
    _kill_query_head(model, 0, 2)
    _kill_query_head(model, 1, 0)
    _kill_query_head(model, 1, 3)
    dead = list(range(0, INTER, 4))  # a quarter of the channels
    _kill_mlp_channels(model, 0, dead)
    _kill_mlp_channels(model, 1, [c + 1 for c in dead])
    ids = _ids()
    before = _logits(model, ids)
    report = prune_decoder(model, PruneOptions(mlp_ratio=0.25, heads_ratio=0.5, head_unit="query"))
    assert report.num_attention_heads == (4, 2) and report.num_key_value_heads == (2, 2)
    assert report.intermediate_size == (128, 96) and report.head_dim == HEAD_DIM
    # Same function computed with fewer terms: float32 summation order only (1e-5 absolute).
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=0)
    assert model.model.layers[0].self_attn.num_key_value_groups == 1


def test_query_heads_are_removed_evenly_per_kv_group() -> None:
    # Both heads of group 0 outrank both heads of group 1; a global ranking would keep heads 0 and 1 (both
    # on KV head 0). Per group, the best of each is kept: head 0 (x10) and head 3 (x2).
    model = _tiny_llama()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        for head, scale in ((0, 10.0), (1, 5.0), (2, 0.5), (3, 2.0)):
            rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            attn.q_proj.weight[rows] *= scale
            attn.o_proj.weight[:, rows] *= scale
    q = attn.q_proj.weight.detach().clone().view(HEADS, HEAD_DIM, -1)  # (heads, head_dim, hidden)
    prune_decoder(model, PruneOptions(heads_ratio=0.5, head_unit="query"))
    kept = model.model.layers[0].self_attn.q_proj.weight.view(2, HEAD_DIM, -1)  # (2, head_dim, hidden)
    assert torch.equal(kept[0], q[0]) and torch.equal(kept[1], q[3])


def test_removing_a_dead_kv_group_keeps_logits_exactly() -> None:
    model = _tiny_llama()
    for layer, group in ((0, 0), (1, 1)):
        for head in (2 * group, 2 * group + 1):
            _kill_query_head(model, layer, head)
        attn = model.model.layers[layer].self_attn
        with torch.no_grad():
            attn.k_proj.weight[group * HEAD_DIM : (group + 1) * HEAD_DIM] = 0.0
            attn.v_proj.weight[group * HEAD_DIM : (group + 1) * HEAD_DIM] = 0.0
    ids = _ids()
    before = _logits(model, ids)
    report = prune_decoder(model, PruneOptions(heads_ratio=0.5, head_unit="kv_group"))
    assert report.num_attention_heads == (4, 2) and report.num_key_value_heads == (2, 1)
    assert model.model.layers[0].self_attn.k_proj.out_features == HEAD_DIM
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=0)


def test_pruned_model_saves_reloads_with_identical_logits_and_counts_params(tmp_path) -> None:
    model = _tiny_llama()
    report = prune_decoder(model, PruneOptions(mlp_ratio=0.5, heads_ratio=0.5))
    hidden, layers = 64, 2
    removed_per_layer = 3 * hidden * (INTER - 64) + 2 * hidden * HEAD_DIM * (HEADS - 2)  # MLP + q/o heads
    assert report.params_before - report.params_after == layers * removed_per_layer
    model.save_pretrained(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert (again.config.num_attention_heads, again.config.num_key_value_heads) == (2, 2)
    assert again.config.intermediate_size == 64 and again.config.head_dim == HEAD_DIM
    ids = _ids(1)
    assert torch.equal(_logits(again, ids), _logits(model, ids))
    # A cached greedy decode still works (the KV cache shape comes from the pruned k/v projections).
    out = again.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 14)


def test_wanda_ranks_by_activation_not_weight_size() -> None:
    # Channels 0-31 have huge gate/up rows but zero down_proj columns: magnitude keeps them, while
    # Wanda (|W_down| * ||X||) scores them 0 and removes them.
    model = _tiny_llama()
    for layer in model.model.layers:
        with torch.no_grad():
            layer.mlp.gate_proj.weight[:32] *= 50.0
            layer.mlp.up_proj.weight[:32] *= 50.0
            layer.mlp.down_proj.weight[:, :32] = 0.0
    magnitude = copy.deepcopy(model)
    opts = PruneOptions(importance="wanda", mlp_ratio=0.25)
    prune_decoder(model, opts, calib_batches=[_ids(2), {"input_ids": _ids(3)}])
    prune_decoder(magnitude, PruneOptions(importance="l2", mlp_ratio=0.25))
    down = model.model.layers[0].mlp.down_proj.weight
    assert (down.abs().sum(0) > 0).all(), "every dead channel was removed"
    assert (magnitude.model.layers[0].mlp.down_proj.weight.abs().sum(0) == 0).sum() == 32
    with pytest.raises(ValueError, match="calibration"):
        prune_decoder(_tiny_llama(), opts)


def test_rejected_options() -> None:
    with pytest.raises(ValueError, match="allowed: l1, l2, wanda"):
        prune_decoder(_tiny_llama(), PruneOptions(importance="taylor", mlp_ratio=0.5))
    with pytest.raises(ValueError, match="both are 0"):
        prune_decoder(_tiny_llama(), PruneOptions())
    with pytest.raises(ValueError, match="not a Hugging Face decoder"):
        prune_decoder(torch.nn.Linear(2, 2), PruneOptions(mlp_ratio=0.5))


def test_planned_sizes_round_and_never_empty() -> None:
    config = transformers.LlamaConfig(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536
    )  # SmolLM2-135M's shape
    assert planned_sizes(config, PruneOptions(mlp_ratio=0.3, heads_ratio=0.34)) == (1072, 6, 3)
    assert planned_sizes(config, PruneOptions(heads_ratio=0.99, head_unit="kv_group")) == (1536, 3, 1)
    assert planned_sizes(config, PruneOptions(mlp_ratio=0.999, round_to=64)) == (64, 9, 3)


def test_pruned_model_exports_to_onnx_with_kv_cache(tmp_path) -> None:
    from compress.families.causal_lm.sessions import OrtCausalLM

    onnx_export = pytest.importorskip(
        "compress.families.causal_lm.export", reason="the LLM ONNX exporter is not present"
    )
    model = _tiny_llama()
    prune_decoder(model, PruneOptions(mlp_ratio=0.5, heads_ratio=0.5))
    path = onnx_export.export_decoder(model, tmp_path / "pruned.onnx")
    # 1e-4: float32 ORT vs torch on a 2-layer model; greedy tokens must match exactly.
    report = onnx_export.check_parity(model, OrtCausalLM(path), np.arange(1, 9), atol=1e-4, steps=4)
    assert report.ok, report
