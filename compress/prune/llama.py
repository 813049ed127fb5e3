"""Structured pruning of Hugging Face Llama-style decoders (Llama, SmolLM2, Qwen2, Mistral layouts).

Written by us rather than through torch-pruning: its DependencyGraph did not finish in over 10 minutes on
a grouped-query-attention Llama here (docs: ASSETS.md), and its LLM example breaks on Llama-3.2 /
Qwen2.5 shapes (torch-pruning issues #516, #461). A decoder's couplings are few and known, so we slice
them directly:

- MLP width: row j of gate_proj and up_proj and column j of down_proj go together.
- Attention heads, grouped-query aware. `head_unit: query` removes the same number of query heads from
  every KV group (KV heads all kept), so query head h' still reads KV head h' // groups after
  re-indexing; `head_unit: kv_group` removes whole groups (a KV head, its k/v rows, and all of its query
  heads). head_dim never changes (rotary embeddings depend on it).

Every layer keeps the same counts (which channels/heads differ per layer), because `LlamaConfig` has one
`intermediate_size`, `num_attention_heads` and `num_key_value_heads` for all layers: the pruned model
saves with `save_pretrained` and reloads with plain `from_pretrained`. `config.head_dim` stays explicit.

Importance of a channel or head (ranked within its layer):
- l1 / l2: p-th power sum of its coupled weights (gate+up rows and down column; q rows and o columns,
  plus k/v rows for a whole group) - LLM-Pruner's vector-wise magnitude (Ma et al. 2023, arXiv 2305.11627).
- wanda: Wanda's |W_ij| * ||X_j||_2 (Sun et al. 2023, arXiv 2306.11695) summed over the output column of
  down_proj / o_proj that the channel feeds, with X the calibration activations entering that layer.

    from compress.prune.llama import prune_llama
    report = prune_llama(model, PruneOptions(mlp_ratio=0.25, heads_ratio=0.34), calib_batches=[ids])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.errors import ConfigError, StageError
from compress.prune.options import LLM_IMPORTANCES, PruneOptions


@dataclass(frozen=True)
class LlamaPruneReport:
    params_before: int
    params_after: int
    intermediate_size: tuple[int, int]  # (before, after)
    num_attention_heads: tuple[int, int]
    num_key_value_heads: tuple[int, int]
    head_dim: int
    layers: int

    @property
    def params_reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before


def _layers(model: nn.Module) -> Sequence[nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    needed = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    if layers is None or not hasattr(model, "config"):
        raise ConfigError(f"prune_llama: {type(model).__name__} is not a Llama-style decoder (model.model.layers)")
    for layer in layers:
        names = dict(layer.named_modules())
        missing = [n for n in needed if not isinstance(names.get(n), nn.Linear)]
        if missing:
            raise ConfigError(f"prune_llama: decoder layer {type(layer).__name__} lacks Linear {missing}")
    return layers


def _sliced_linear(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    weight = linear.weight.data
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = linear.bias
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias.data if rows is None else bias.data[rows])
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of the given heads in a (heads * head_dim, hidden) projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)  # (len(heads) * head_dim,)


def _norm_sum(weight: torch.Tensor, p: int, dim: int) -> torch.Tensor:
    return weight.float().abs().pow(p).sum(dim)


class _InputNorms:
    """Sum over calibration tokens of x_j^2 entering each down_proj and o_proj (for Wanda)."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.sq: dict[nn.Module, torch.Tensor] = {}
        self._hooks = []
        for layer in layers:
            for linear in (layer.mlp.down_proj, layer.self_attn.o_proj):
                self._hooks.append(linear.register_forward_pre_hook(self._hook))

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, in_features)
        total = x.pow(2).sum(0)
        self.sq[module] = self.sq[module] + total if module in self.sq else total

    def norm(self, module: nn.Module) -> torch.Tensor:
        return self.sq[module].sqrt()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _collect_norms(model: nn.Module, layers: Sequence[nn.Module], batches: Sequence[Any]) -> _InputNorms:
    norms = _InputNorms(layers)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, torch.Tensor):
                    model(input_ids=batch, use_cache=False)
                else:
                    model(
                        **{k: batch[k] for k in ("input_ids", "attention_mask") if k in batch},
                        use_cache=False,
                    )
    finally:
        norms.remove()
        model.train(was_training)
    if not norms.sq:
        raise StageError("prune_llama: importance 'wanda' got no calibration tokens")
    return norms


def _mlp_scores(mlp: nn.Module, options: PruneOptions, norms: _InputNorms | None) -> torch.Tensor:
    if norms is not None:  # Wanda: ||X_j|| * sum_i |W_down[i, j]|
        return norms.norm(mlp.down_proj) * _norm_sum(mlp.down_proj.weight, 1, 0)  # (intermediate,)
    p = 1 if options.importance == "l1" else 2
    return (
        _norm_sum(mlp.gate_proj.weight, p, 1)
        + _norm_sum(mlp.up_proj.weight, p, 1)
        + _norm_sum(mlp.down_proj.weight, p, 0)
    )  # (intermediate,)


def _head_scores(
    attn: nn.Module, heads: int, head_dim: int, options: PruneOptions, norms: _InputNorms | None
) -> torch.Tensor:
    if norms is not None:
        per_dim = norms.norm(attn.o_proj) * _norm_sum(attn.o_proj.weight, 1, 0)  # (heads * head_dim,)
    else:
        p = 1 if options.importance == "l1" else 2
        per_dim = _norm_sum(attn.q_proj.weight, p, 1) + _norm_sum(attn.o_proj.weight, p, 0)
    return per_dim.view(heads, head_dim).sum(1)  # (heads,)


def _kv_scores(attn: nn.Module, kv_heads: int, head_dim: int, options: PruneOptions) -> torch.Tensor:
    p = 1 if options.importance == "l1" else 2
    per_dim = _norm_sum(attn.k_proj.weight, p, 1) + _norm_sum(attn.v_proj.weight, p, 1)  # (kv * head_dim,)
    return per_dim.view(kv_heads, head_dim).sum(1)  # (kv_heads,)


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` largest scores, in their original order (so head order is preserved)."""
    return torch.topk(scores, keep).indices.sort().values


def planned_sizes(config: Any, options: PruneOptions) -> tuple[int, int, int]:
    """(intermediate_size, num_attention_heads, num_key_value_heads) after pruning with `options`."""
    inter, heads = config.intermediate_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv:
        raise ConfigError(f"prune_llama: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    new_inter = inter
    if options.mlp_ratio > 0:
        step = options.round_to
        new_inter = min(inter, max(step, round(inter * (1 - options.mlp_ratio) / step) * step))
    groups = heads // kv
    new_heads, new_kv = heads, kv
    if options.heads_ratio > 0:
        if options.head_unit == "query":
            new_heads = kv * max(1, round(groups * (1 - options.heads_ratio)))
        else:
            new_kv = max(1, round(kv * (1 - options.heads_ratio)))
            new_heads = new_kv * groups
    return new_inter, new_heads, new_kv


def prune_llama(
    model: nn.Module,
    options: PruneOptions,
    *,
    calib_batches: Sequence[Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LlamaPruneReport:
    """Prune MLP width (`mlp_ratio`) and attention heads (`heads_ratio`) of every layer, in place.

    `calib_batches` (input_ids tensors, or dicts with input_ids / attention_mask) are needed for `wanda`
    importance only. `progress(layer_done, layers)` is called after each layer. The config's sizes are
    updated so `save_pretrained` / `from_pretrained` round-trip.
    """
    if options.importance not in LLM_IMPORTANCES:
        raise ConfigError(
            f"prune.importance = {options.importance!r} is not available for causal-lm models; "
            f"allowed: {', '.join(LLM_IMPORTANCES)}"
        )
    if options.mlp_ratio == 0 and options.heads_ratio == 0:
        raise ConfigError("prune (causal-lm): set mlp_ratio and/or heads_ratio above 0; both are 0")
    layers = _layers(model)
    config = model.config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    inter = config.intermediate_size
    new_inter, new_heads, new_kv = planned_sizes(config, options)
    groups, new_groups = heads // kv, new_heads // new_kv
    norms = None
    if options.importance == "wanda":
        if not calib_batches:
            raise ConfigError("prune.importance = 'wanda' needs calibration text (calib_batches); none given")
        norms = _collect_norms(model, layers, calib_batches)
    params_before = sum(p.numel() for p in model.parameters())

    with torch.no_grad():
        for done, layer in enumerate(layers, start=1):
            mlp, attn = layer.mlp, layer.self_attn
            if new_inter < inter:
                keep = _top(_mlp_scores(mlp, options, norms), new_inter).to(mlp.down_proj.weight.device)
                mlp.gate_proj = _sliced_linear(mlp.gate_proj, keep, None)
                mlp.up_proj = _sliced_linear(mlp.up_proj, keep, None)
                mlp.down_proj = _sliced_linear(mlp.down_proj, None, keep)
                if hasattr(mlp, "intermediate_size"):
                    mlp.intermediate_size = new_inter
            if new_heads < heads:
                scores = _head_scores(attn, heads, head_dim, options, norms).view(kv, groups)  # (kv, groups)
                if options.head_unit == "query":
                    per_group = [g * groups + _top(scores[g], new_groups) for g in range(kv)]
                    q_heads, kv_heads = torch.cat(per_group), None
                else:
                    group_scores = scores.sum(1)
                    if norms is None:
                        group_scores = group_scores + _kv_scores(attn, kv, head_dim, options)
                    kv_heads = _top(group_scores, new_kv)
                    q_heads = (kv_heads[:, None] * groups + torch.arange(groups)).reshape(-1)  # (new_heads,)
                device = attn.q_proj.weight.device
                q_rows = _head_rows(q_heads, head_dim).to(device)
                attn.q_proj = _sliced_linear(attn.q_proj, q_rows, None)
                attn.o_proj = _sliced_linear(attn.o_proj, None, q_rows)
                if kv_heads is not None:
                    kv_rows = _head_rows(kv_heads, head_dim).to(device)
                    attn.k_proj = _sliced_linear(attn.k_proj, kv_rows, None)
                    attn.v_proj = _sliced_linear(attn.v_proj, kv_rows, None)
                attn.num_key_value_groups = new_groups
                for name in ("num_heads", "num_attention_heads"):  # older transformers keep these too
                    if hasattr(attn, name):
                        setattr(attn, name, new_heads)
                if hasattr(attn, "num_key_value_heads"):
                    attn.num_key_value_heads = new_kv
            if progress is not None:
                progress(done, len(layers))

    config.intermediate_size = new_inter
    config.num_attention_heads = new_heads
    config.num_key_value_heads = new_kv
    config.head_dim = head_dim  # explicit: the default hidden_size // heads would now be wrong
    return LlamaPruneReport(
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()),
        intermediate_size=(inter, new_inter),
        num_attention_heads=(heads, new_heads),
        num_key_value_heads=(kv, new_kv),
        head_dim=head_dim,
        layers=len(layers),
    )
