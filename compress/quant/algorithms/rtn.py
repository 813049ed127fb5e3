"""Round-to-nearest group-wise quantization: the baseline every calibrated method must beat."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from compress.quant.algorithms.sequential import LinearFilter, all_linears, default_filter
from compress.quant.primitives.qparams import check_bits_group, column_groups, group_qparams, quantize_codes
from compress.quant.primitives.weight import QuantizedWeight, WeightQuantConfig


def rtn_quantize(weight: torch.Tensor, config: WeightQuantConfig | None = None) -> QuantizedWeight:
    """Quantize ``weight`` ``[out, in]`` group by group along ``in`` with min/max qparams.

    Guarantees ``|W - dequantize()| <= scale / 2`` elementwise (codes never clip: the range covers
    every value of its group).
    """
    cfg = config or WeightQuantConfig()
    check_bits_group(cfg.bits, cfg.group_size)
    w = weight.detach().float()
    scales, zeros = group_qparams(w, cfg.bits, cfg.group_size, cfg.symmetric)  # (out, n_groups)
    gi = column_groups(w.shape[1], cfg.group_size, w.device)
    q = quantize_codes(w, scales[:, gi], zeros[:, gi], cfg.bits)  # (out, in)
    return QuantizedWeight(
        qweight=q.to(torch.uint8).cpu(),
        scales=scales.cpu(),
        zeros=zeros.to(torch.uint8).cpu(),
        group_size=cfg.group_size,
        bits=cfg.bits,
        symmetric=cfg.symmetric,
    )


@torch.no_grad()
def rtn_quantize_model(
    model: nn.Module,
    *,
    layers_filter: LinearFilter | None = None,
    config: WeightQuantConfig | None = None,
    overrides: Mapping[str, WeightQuantConfig] | None = None,
) -> dict[str, QuantizedWeight]:
    """RTN every selected Linear in place (weights become their dequantized values).

    ``overrides`` maps module names to their own config (e.g. ``{"model.layers.0.mlp.down_proj":
    WeightQuantConfig(bits=8)}``); no calibration data is needed.
    """
    cfg = config or WeightQuantConfig()
    result: dict[str, QuantizedWeight] = {}
    for name, mod in all_linears(model, layers_filter or default_filter):
        qw = rtn_quantize(mod.weight, (overrides or {}).get(name, cfg))
        mod.weight.copy_(qw.dequantize(mod.weight.dtype))
        result[name] = qw
    return result
