"""Round-to-nearest group-wise quantization: the baseline every calibrated method must beat."""

from __future__ import annotations

import torch

from compress.quant.int4.weight import QuantizedWeight, WeightQuantConfig
from compress.quant.qparams import check_bits_group, column_groups, group_qparams, quantize_codes


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
