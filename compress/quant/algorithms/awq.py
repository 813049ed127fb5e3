"""AWQ: activation-aware weight quantization (Lin et al. 2023, arXiv 2306.00978).

Salient input channels (large mean |x|) are protected by scaling them up before quantization:
``y = x Wᵀ = (x / s)(W s)ᵀ``. The division by ``s`` is folded into the op that produces ``x``, so
the float model is unchanged and only the rounding changes. Choices made here (following the
authors' llm-awq code, ``auto_scale.py`` / ``auto_clip.py``):

- ``s = mean|x|^alpha``, normalised by ``sqrt(max(s) * min(s))``, for ``alpha`` on a grid of
  ``n_grid`` points ``0, 1/n_grid, ..``, ``(n_grid-1)/n_grid`` (alpha = 0 means s = 1, i.e. plain RTN,
  so the search can never make the objective worse than RTN).
- Objective: MSE of the *outputs of the Linears that share the input* (q/k/v together, gate/up
  together), not of the whole attention / MLP block as llm-awq does -- cheaper, and it keeps each
  search exact and self-contained. Searches use at most ``max_tokens`` sampled calibration tokens.
- Folds, from the decoder's architecture map (``DecoderArch.scale_groups``): the attention norm's weight
  for q/k/v, the MLP norm's weight for gate/up (RMSNorm computes ``x_hat * (offset + weight)``, offset 1
  for Gemma: ``weight' = (offset + weight) / s - offset``), ``v`` rows for ``o`` (only when each ``o``
  input column is one ``v`` row, i.e. no grouped-query attention, as in llm-awq), ``up`` rows for
  ``down``. For a fused producer (Phi-3's ``qkv_proj``, ``gate_up_proj``) only the rows of the part that
  feeds the consumer are divided (the ``v`` third, the ``up`` half); a group whose fold would not be exact
  is skipped and reported through ``on_skip``.
- Optional clipping search (llm-awq ``auto_clip``): per output row and group, shrink the weight range
  by ``r`` in ``1, 1-1/n, ..`` down to ``1 - clip_max_shrink`` and keep the r with the least error of that
  group's partial output; r = 1 is in the grid. Skipped for q/k (a fused qkv too) as in llm-awq (their
  error is amplified by the softmax, which a Linear-output MSE does not see).
- Then RTN (default) or GPTQ on the scaled, clipped weights, with scaled inputs for GPTQ's Hessian.
All scale/clip decisions of a decoder layer are taken on its float weights before any of them is
quantized (a fold into ``up_proj`` after it was quantized would undo its rounding); layers run in
sequence, each on the outputs of the already quantized previous layers and with its own arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from compress.errors import StageError
from compress.families.causal_lm.archs import DecoderArch, ScaleGroup, find_arch, supported_model_types
from compress.quant.algorithms.gptq import GPTQConfig, HessianAccumulator, gptq_quantize_weight
from compress.quant.algorithms.rtn import rtn_quantize
from compress.quant.algorithms.sequential import (
    LayerInputs,
    LinearFilter,
    Progress,
    collect_linear_inputs,
    default_filter,
    walk_layers,
)
from compress.quant.primitives.weight import QuantizedWeight, WeightQuantConfig


class AWQConfig(WeightQuantConfig):
    """AWQ options (adds to bits / group_size / symmetric).

    YAML: ``{method: awq, group_size: 128, n_grid: 20, clip: true}``
    """

    n_grid: int = Field(20, ge=1, le=200, description="Number of alpha values tried in [0, 1).")
    clip: bool = Field(True, description="Search a per-group weight clipping ratio after scaling.")
    clip_grid: int = Field(20, ge=1, description="Clipping ratios step 1/clip_grid.")
    clip_max_shrink: float = Field(0.5, ge=0.0, lt=1.0, description="Smallest ratio tried is 1 - this.")
    max_tokens: int = Field(2048, ge=16, description="Calibration tokens sampled for the searches.")
    quantizer: Literal["rtn", "gptq"] = Field("rtn", description="Quantizer applied to the scaled weights.")
    seed: int = Field(0, description="Seed of the token sampling.")


def _rtn_fake(w: torch.Tensor, cfg: WeightQuantConfig) -> torch.Tensor:
    return rtn_quantize(w, cfg).dequantize()


def _sample(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(x.shape[0], generator=g)[:n]]


@torch.no_grad()
def awq_search_scale(
    x: torch.Tensor, weights: list[torch.Tensor], config: AWQConfig | None = None
) -> tuple[torch.Tensor, float, float]:
    """Best AWQ scale for Linears sharing input ``x`` ``(tokens, in)``.

    Returns ``(s [in], best_mse, rtn_mse)``; ``best_mse <= rtn_mse`` always (alpha = 0 is s = 1).
    """
    cfg = config or AWQConfig()
    x = _sample(x.reshape(-1, x.shape[-1]).float(), cfg.max_tokens, cfg.seed)  # (T, in)
    W = torch.cat([w.float() for w in weights], dim=0)  # (sum out, in)
    ref = x @ W.T
    x_mean = x.abs().mean(dim=0)
    best = (float("inf"), torch.ones_like(x_mean))
    rtn_err = float("nan")
    for k in range(cfg.n_grid):
        alpha = k / cfg.n_grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        if alpha == 0:
            s = torch.ones_like(x_mean)
        wq = _rtn_fake(W * s, cfg) / s
        err = float((x @ wq.T - ref).pow(2).mean())
        if alpha == 0:
            rtn_err = err
        if err < best[0]:
            best = (err, s)
    return best[1], best[0], rtn_err


@torch.no_grad()
def awq_search_clip(x: torch.Tensor, w: torch.Tensor, config: AWQConfig | None = None) -> torch.Tensor:
    """Clip ``w`` ``[out, in]`` per (row, group) to the range ratio minimising the group's output MSE."""
    cfg = config or AWQConfig()
    x = _sample(x.reshape(-1, x.shape[-1]).float(), min(cfg.max_tokens, 512), cfg.seed)  # (T, in)
    w = w.float()
    in_f = w.shape[1]
    g = in_f if cfg.group_size == -1 else cfg.group_size
    group_cfg = cfg.model_copy(update={"group_size": -1})
    out = w.clone()
    n_ratio = max(1, int(round(cfg.clip_max_shrink * cfg.clip_grid)) + 1)
    for start in range(0, in_f, g):
        xg, wg = x[:, start : start + g], w[:, start : start + g]  # (T, g), (out, g)
        ref = xg @ wg.T  # (T, out)
        wmax = wg.max(dim=1, keepdim=True).values.clamp(min=0)
        wmin = wg.min(dim=1, keepdim=True).values.clamp(max=0)
        best_err = torch.full((wg.shape[0],), float("inf"))
        best_w = wg
        for k in range(n_ratio):
            r = 1.0 - k / cfg.clip_grid
            cw = torch.maximum(torch.minimum(wg, wmax * r), wmin * r)
            err = (xg @ _rtn_fake(cw, group_cfg).T - ref).pow(2).mean(dim=0)  # (out,)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_w = torch.where(better.unsqueeze(1), cw, best_w)
        out[:, start : start + g] = best_w
    return out


@torch.no_grad()
def fold_scale(producer: nn.Module, s: torch.Tensor, *, norm_offset: float = 0.0, rows: slice | None = None) -> None:
    """Divide the output channels of ``producer`` by ``s`` (exact in real arithmetic).

    A Linear: its rows (``rows`` of a fused one) and bias. A norm computing ``x_hat * (norm_offset + w)``:
    ``w' = (norm_offset + w) / s - norm_offset``. Multiplying the consumers' input columns by ``s`` then
    gives back the same function.
    """
    if isinstance(producer, nn.Linear):
        part = rows or slice(None)
        producer.weight[part].div_(s.unsqueeze(1).to(producer.weight.dtype))
        if producer.bias is not None:
            producer.bias[part].div_(s.to(producer.bias.dtype))
        return
    weight = getattr(producer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != s.shape:
        raise StageError(
            f"cannot fold an AWQ scale into {type(producer).__name__} (needs a weight of shape {tuple(s.shape)})"
        )
    weight.copy_(((norm_offset + weight.double()) / s.double() - norm_offset).to(weight.dtype))


def producer_rows(group: ScaleGroup, producer: nn.Module, consumer: nn.Linear) -> slice | None | str:
    """Rows of ``producer`` feeding ``consumer`` one for one, or why the fold would not be exact."""
    if not isinstance(producer, nn.Linear):
        return None
    index, count = group.part or (0, 1)
    width = consumer.in_features
    if producer.out_features != count * width:
        return (
            f"{group.producer} has {producer.out_features} output rows, not {count} x {width} "
            f"({group.consumers[0]} input columns): grouped-query attention"
        )
    return slice(index * width, (index + 1) * width) if group.part else None


@torch.no_grad()
def awq_quantize_layer(
    layer: nn.Module,
    inputs: LayerInputs,
    keep: LinearFilter,
    prefix: str,
    cfg: AWQConfig,
    arch: DecoderArch,
    on_skip: Callable[[str], None] | None = None,
    on_float: Callable[[str, torch.Tensor], None] | None = None,
) -> dict[str, QuantizedWeight]:
    """AWQ one decoder layer in place (scale search, folds, clipping, quantization); ``on_float(name, weight)``
    hears each Linear's scaled float weight just before it is clipped and quantized."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    x_of = {n: torch.cat(v, dim=0) for n, v in collect_linear_inputs(layer, inputs).items()}

    for group in arch.scale_groups:
        names = [n for n in group.consumers if n in linears]
        scored = [n for n in names if keep(prefix + n, linears[n])]
        if not scored:
            continue
        producer = layer.get_submodule(group.producer)
        rows = producer_rows(group, producer, linears[names[0]])
        if isinstance(rows, str):
            if on_skip:
                on_skip(f"{prefix}{group.producer} -> {', '.join(names)}: {rows}")
            continue
        x = x_of[names[0]]
        s, _, _ = awq_search_scale(x, [linears[n].weight for n in scored], cfg)
        fold_scale(producer, s, norm_offset=arch.norm_offset, rows=rows)
        for n in names:
            linears[n].weight.mul_(s.unsqueeze(0).to(linears[n].weight.dtype))
        scaled = x / s
        for n in names:
            x_of[n] = scaled

    result: dict[str, QuantizedWeight] = {}
    for n, mod in linears.items():
        if not keep(prefix + n, mod) or n not in x_of:
            continue
        w = mod.weight.detach().float()
        if on_float:
            on_float(prefix + n, w)
        if cfg.clip and n not in arch.softmax_inputs:
            w = awq_search_clip(x_of[n], w, cfg)
        if cfg.quantizer == "gptq":
            acc = HessianAccumulator(mod.in_features)
            acc.add(x_of[n])
            base = cfg.model_dump(include={"bits", "group_size", "symmetric"})
            qw = gptq_quantize_weight(w, acc.H, GPTQConfig(**base))
        else:
            qw = rtn_quantize(w, cfg)
        mod.weight.copy_(qw.dequantize(mod.weight.dtype))
        result[prefix + n] = qw
    return result


@torch.no_grad()
def awq_quantize_model(
    model: nn.Module,
    calib_batches: Iterable[Any],
    *,
    layers_filter: LinearFilter | None = None,
    config: AWQConfig | None = None,
    progress: Progress | None = None,
    on_skip: Callable[[str], None] | None = None,
    on_float: Callable[[str, torch.Tensor], None] | None = None,
) -> dict[str, QuantizedWeight]:
    """AWQ every selected Linear of a mapped decoder in place; returns ``{name: QuantizedWeight}``.

    ``on_skip(message)`` hears of each scale group left unscaled (its fold would not be exact);
    ``on_float(name, weight)`` of each Linear's scaled float weight before it is quantized (the float
    equivalent of the quantized model, e.g. to quantize that Linear at other bits later).
    The model keeps the float-equivalent folds (RMSNorm weights / producer rows divided by ``s``)
    and its quantized Linears hold their dequantized weights, so exporting it afterwards gives the
    graph the returned QuantizedWeights belong to.
    """
    cfg = config or AWQConfig()
    keep = layers_filter or default_filter
    arch = find_arch(model)
    if arch is None:
        raise StageError(
            f"AWQ folds its scales into the op before each Linear and needs a decoder with an architecture map "
            f"({', '.join(supported_model_types())}); {type(model).__name__} has none: use method gptq or rtn"
        )
    batches = list(calib_batches)
    if not batches:
        raise StageError("AWQ needs calibration batches; got none")
    n_layers = len(model.get_submodule(arch.layers))
    result: dict[str, QuantizedWeight] = {}
    for i, prefix, layer, inputs in walk_layers(model, arch, batches):
        result.update(awq_quantize_layer(layer, inputs, keep, prefix, cfg, arch, on_skip, on_float))
        if progress:
            progress(i + 1, n_layers, f"AWQ decoder layer {i}")
    return result
