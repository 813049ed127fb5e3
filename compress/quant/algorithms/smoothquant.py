"""SmoothQuant (Xiao et al. 2022, arXiv 2211.10438): move activation outliers into the weights before W8A8.

A decoder's norm outputs carry a few channels far larger than the rest; with one activation scale per
tensor (ONNX Runtime's ``DynamicQuantizeLinear``) those channels leave the others a handful of levels.
Per input channel ``j``: ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (``W_j``: column ``j`` of every
Linear reading ``X``), then ``y = (X / s)(W s)^T``: the division folded *exactly* into the op producing
``X``, the multiplication into the Linears' columns, so the float model computes the same function (up to
float rounding) and only the INT8 rounding changes. Folds, from the decoder's architecture map
(``DecoderArch.scale_groups``, the same groups as AWQ, whose ``fold_scale`` this reuses):

- q/k/v: into ``input_layernorm``'s weight; gate/up: into ``post_attention_layernorm``'s weight (a norm's
  ``norm_offset`` as for Gemma).
- down: into ``up_proj``'s output rows (``act(gate) * up`` is linear in ``up``).
- lm_head (``head=True``): into the final norm's weight; a tied head is first given its own copy of the
  table (the embedding Gather keeps the float one: the dynamic export stores an 8-bit copy of the head either
  way). Its output error, as every group's, is scored on ``SCORE_ROWS`` sampled output rows.
- o: into ``v_proj``'s output rows. With grouped-query attention (SmolLM2: 9 query / 3 KV heads) each ``v``
  row feeds the ``o`` columns of every query head sharing its KV head, so ``s`` is taken per ``v`` row
  (max of ``|X|`` and of ``|W|`` over those columns) and repeated over them: still exact. A fused ``qkv``
  with grouped-query attention (no head layout to read) is left unsmoothed and reported.

``alpha``: a number applies to every group; ``auto`` searches ``ALPHA_GRID`` (and ``s = 1``, plain dynamic
W8A8, so the search can never choose worse than no smoothing on the calibration data) per scale group,
keeping the alpha with the least output MSE of the group's Linears under a simulation of the export's
arithmetic (``fake_dynamic_w8a8``: uint8 asymmetric activations with one scale per calibration window, or
one symmetric scale per token with ``activations: token``; int8 symmetric per-output-channel weights).

Why our own code: ONNX Runtime's ``quantize_static(extra_options={"SmoothQuant": True})`` delegates to
Intel Neural Compressor (not a dependency here) and serves the static Q/DQ path, not the dynamic
``MatMulInteger`` one; NNCF's SmoothQuant is part of its static PTQ (``nncf.quantize``) whose ONNX output ran
5-7x slower in ONNX Runtime here (ASSETS). The transform itself is a per-channel rescale on the torch model,
which the existing AWQ folds already do exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compress.errors import StageError
from compress.families.causal_lm.archs import ScaleGroup, find_arch, supported_model_types
from compress.quant.algorithms.awq import fold_scale, producer_rows
from compress.quant.algorithms.sequential import Progress, collect_linear_inputs, walk_layers

#: alphas `alpha: auto` tries per scale group (the paper's range; 0.5 is its default)
ALPHA_GRID: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
#: what the alpha search scores: at most this many calibration windows and sampled output rows of a group
#: (the weight scales are per row, so a row's error does not depend on the others; the lm_head has 49152).
#: The channel maxima come from every window. On SmolLM2 with 16 windows and every row a layer took ~46 s at
#: 1 thread on a loaded machine.
SCORE_WINDOWS = 4
SCORE_ROWS = 1024
_EPS = 1e-5


@dataclass
class SmoothReport:
    """What `smooth_model` did: the alpha of each smoothed group (None: ``s = 1`` won) and what was skipped."""

    alphas: dict[str, float | None] = field(default_factory=dict)  # "model.layers.0.input_layernorm" -> alpha
    skipped: list[str] = field(default_factory=list)
    error_ratio: dict[str, float] = field(default_factory=dict)  # chosen MSE / MSE without smoothing


def fake_dynamic_w8a8(
    x: torch.Tensor, w: torch.Tensor, *, reduce_range: bool = False, per_token: bool = False
) -> torch.Tensor:
    """``x @ w.T`` as ONNX Runtime's dynamic INT8 MatMul computes it (``quantize_dynamic``, per-channel).

    ``x`` ``(windows, tokens, in)``: uint8 asymmetric, one scale / zero point per window (DynamicQuantizeLinear
    on one prefill), or with ``per_token`` symmetric, one scale ``max|x| / 127`` per token (``int8_per_token``;
    its zero point 128 only shifts the codes); ``w`` ``(out, in)``: int8 symmetric per output row,
    ``[-127, 127]`` (``[-64, 64]`` with ``reduce_range``).
    """
    if per_token:
        from compress.quant.algorithms.int8_per_token import EPS

        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS) / 127
        xq = torch.round(x / scale).clamp(-128, 127).mul(scale)
    else:
        lo = x.amin(dim=(1, 2), keepdim=True).clamp(max=0)
        hi = x.amax(dim=(1, 2), keepdim=True).clamp(min=0)
        scale = ((hi - lo) / 255).clamp(min=1e-12)
        zero = torch.round(-lo / scale).clamp(0, 255)
        xq = (torch.round(x / scale) + zero).clamp(0, 255).sub(zero).mul(scale)
    qmax = 64 if reduce_range else 127
    wscale = (w.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-12)
    wq = torch.round(w / wscale).clamp(-qmax, qmax) * wscale
    return xq @ wq.T


def smooth_scale(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = x_max^alpha / w_max^(1 - alpha)``; 1 on channels where either is zero (nothing to balance)."""
    s = x_max.clamp(min=_EPS).pow(alpha) / w_max.clamp(min=_EPS).pow(1 - alpha)
    return torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))


def _columns_of_rows(layer: nn.Module, group: ScaleGroup, producer: nn.Module, consumer: nn.Linear) -> Any:
    """How consumer columns map to producer channels: (rows of the producer or None, index per column or
    None for one to one), or why the fold would not be exact (a str)."""
    rows = producer_rows(group, producer, consumer)
    if not isinstance(rows, str):
        return rows, None
    attention = layer.get_submodule(group.producer.rsplit(".", 1)[0]) if "." in group.producer else layer
    head_dim = getattr(attention, "head_dim", None)
    if group.part or not isinstance(producer, nn.Linear) or not head_dim:
        return rows
    width = consumer.in_features
    if producer.out_features % head_dim or width % producer.out_features:
        return f"{rows} (head_dim {head_dim} does not divide it)"
    groups = width // producer.out_features  # query heads per KV head
    col = torch.arange(width)
    return None, (col // head_dim // groups) * head_dim + col % head_dim  # o column -> v row


def _reduce(values: torch.Tensor, index: torch.Tensor | None, size: int) -> torch.Tensor:
    """Max of per-column ``values`` over the columns that share a producer channel."""
    if index is None:
        return values
    return torch.zeros(size).scatter_reduce(0, index, values, reduce="amax", include_self=False)


@torch.no_grad()
def _choose(
    x: torch.Tensor,
    w: torch.Tensor,
    candidates: list[tuple[float | None, torch.Tensor]],
    reduce_range: bool,
    per_token: bool,
) -> tuple[float | None, torch.Tensor, float]:
    """The candidate ``(alpha, s per column)`` with the least output MSE; returns it and its MSE / that of s = 1."""
    x = x[:SCORE_WINDOWS]
    if w.shape[0] > SCORE_ROWS:
        w = w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))[:SCORE_ROWS]]
    ref = x @ w.T
    scored = []
    for alpha, s in candidates:
        got = fake_dynamic_w8a8(x / s, w * s, reduce_range=reduce_range, per_token=per_token)
        err = float((got - ref).pow(2).mean())
        scored.append((err, alpha, s))
    best = min(scored, key=lambda t: t[0])
    plain = next((err for err, alpha, _ in scored if alpha is None), best[0])
    return best[1], best[2], best[0] / plain if plain > 0 else 1.0


@torch.no_grad()
def smooth_layer(
    layer: nn.Module,
    x_of: dict[str, torch.Tensor],
    groups: Iterable[ScaleGroup],
    *,
    alpha: float | None,
    norm_offset: float = 0.0,
    reduce_range: bool = False,
    per_token: bool = False,
    prefix: str = "",
    report: SmoothReport | None = None,
) -> SmoothReport:
    """Smooth one decoder layer in place. ``x_of``: each Linear's inputs ``(windows, tokens, in)``, updated as
    the folds scale them; ``alpha`` None searches ``ALPHA_GRID`` (and s = 1) per group."""
    report = report if report is not None else SmoothReport()
    for group in groups:
        names = [n for n in group.consumers if n in x_of]
        if not names:
            continue
        producer = layer.get_submodule(group.producer)
        consumers = [layer.get_submodule(n) for n in names]
        mapping = _columns_of_rows(layer, group, producer, consumers[0])
        if isinstance(mapping, str):
            report.skipped.append(f"{prefix}{group.producer} -> {', '.join(names)}: {mapping}")
            continue
        rows, index = mapping
        x = x_of[names[0]]
        w = torch.cat([c.weight.float() for c in consumers], dim=0)  # (sum out, in)
        size = int(index.max()) + 1 if index is not None else w.shape[1]
        x_max = _reduce(x.abs().amax(dim=(0, 1)), index, size)
        w_max = _reduce(w.abs().amax(dim=0), index, size)
        alphas = ALPHA_GRID if alpha is None else (alpha,)
        channel = [(a, smooth_scale(x_max, w_max, a)) for a in alphas]
        if alpha is None:
            channel.append((None, torch.ones(size)))
        per_column = [(a, s if index is None else s[index]) for a, s in channel]
        chosen, s_col, ratio = _choose(x, w, per_column, reduce_range, per_token)
        key = prefix + group.producer
        report.alphas[key], report.error_ratio[key] = chosen, round(ratio, 4)
        if chosen is None:
            continue
        s = dict(channel)[chosen]
        fold_scale(producer, s, norm_offset=norm_offset, rows=rows)
        for name, consumer in zip(names, consumers, strict=True):
            consumer.weight.mul_(s_col.to(consumer.weight.dtype))
            x_of[name] = x / s_col
    return report


@torch.no_grad()
def smooth_model(
    model: nn.Module,
    calib_batches: Iterable[Any],
    *,
    alpha: float | None = None,
    reduce_range: bool = False,
    per_token: bool = False,
    head: bool = False,
    progress: Progress | None = None,
) -> SmoothReport:
    """SmoothQuant every decoder layer of a mapped decoder in place (float function unchanged).

    ``calib_batches``: one window (``(1, T)`` token tensor or mapping) per batch, all of one length: each is one
    per-tensor activation scale of the simulated export (``per_token``: one scale per token, as the
    ``activations: token`` export). ``alpha`` None: searched per scale group. ``head``:
    the lm_head too (untied from the embedding when tied).
    """
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant alpha = {alpha}; allowed: auto or a number in [0, 1]")
    arch = find_arch(model)
    if arch is None:
        raise StageError(
            f"SmoothQuant folds its scales into the op before each Linear and needs a decoder with an architecture "
            f"map ({', '.join(supported_model_types())}); {type(model).__name__} has none: use method dynamic"
        )
    batches = list(calib_batches)
    if not batches:
        raise StageError("SmoothQuant needs calibration batches; got none")
    report = SmoothReport()
    n_layers = len(model.get_submodule(arch.layers))
    for i, prefix, layer, inputs in walk_layers(model, arch, batches):
        x_of = {n: torch.stack(v) for n, v in collect_linear_inputs(layer, inputs).items()}  # (windows, T, in)
        smooth_layer(
            layer,
            x_of,
            arch.scale_groups,
            alpha=alpha,
            norm_offset=arch.norm_offset,
            reduce_range=reduce_range,
            per_token=per_token,
            prefix=prefix,
            report=report,
        )
        if progress:
            progress(i + 1, n_layers, f"SmoothQuant decoder layer {i}")
    if head:
        _smooth_head(model, arch, batches, alpha=alpha, reduce_range=reduce_range, per_token=per_token, report=report)
    return report


@torch.no_grad()
def _smooth_head(model: nn.Module, arch: Any, batches: list[Any], **kwargs: Any) -> None:
    """Final norm -> lm_head, on the lm_head's inputs over the calibration windows (the layers already smoothed:
    the float hidden states are the same)."""
    from compress.quant.algorithms.sequential import as_model_kwargs

    lm_head, report = model.get_submodule(arch.lm_head), kwargs["report"]
    if not isinstance(lm_head, nn.Linear):
        report.skipped.append(f"{arch.final_norm} -> {arch.lm_head}: not a Linear ({type(lm_head).__name__})")
        return
    embed = model.get_submodule(arch.embed)
    if getattr(embed, "weight", None) is lm_head.weight:  # tied: the head gets its own (scaled) copy
        lm_head.weight = nn.Parameter(lm_head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    inputs: list[torch.Tensor] = []
    hook = lm_head.register_forward_hook(lambda _m, inp, _o: inputs.append(inp[0].detach().float()))
    try:
        for batch in batches:
            model(**as_model_kwargs(batch), use_cache=False)
    finally:
        hook.remove()
    x = torch.cat([t.reshape(-1, t.shape[1], t.shape[-1]) for t in inputs])  # (windows, T, hidden)
    group = ScaleGroup(arch.final_norm, (arch.lm_head,))
    smooth_layer(model, {arch.lm_head: x}, (group,), norm_offset=arch.norm_offset, **kwargs)


def summarize(report: SmoothReport) -> dict[str, Any]:
    """The report as artifact info: alphas chosen per kind of group (counts), mean error ratio, skips."""
    kinds: dict[str, dict[str, int]] = {}
    for key, alpha in report.alphas.items():
        kind = key.rsplit(".", 1)[-1]
        label = "none" if alpha is None else f"{alpha:g}"
        kinds.setdefault(kind, {}).setdefault(label, 0)
        kinds[kind][label] += 1
    ratios = list(report.error_ratio.values())
    return {
        "smoothed_groups": sum(a is not None for a in report.alphas.values()),
        "alphas_by_producer": {k: dict(sorted(v.items())) for k, v in sorted(kinds.items())},
        "mean_error_ratio": round(sum(ratios) / len(ratios), 4) if ratios else None,
        "groups_unsmoothed": list(report.skipped),
    }
