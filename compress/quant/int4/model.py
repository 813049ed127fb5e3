"""Model-level helpers: RTN over a whole model, and the float weights the ONNX rewrite matches on."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from compress.quant.int4.rtn import rtn_quantize
from compress.quant.int4.sequential import LinearFilter, all_linears, default_filter
from compress.quant.int4.weight import QuantizedWeight, WeightQuantConfig


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


def float_weights_of(model: nn.Module, names: Mapping[str, object] | list[str]) -> dict[str, torch.Tensor]:
    """``{name: module.weight}`` for the given module names (what ``quantize_onnx_weights`` matches on)."""
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach().clone() for n in names}
