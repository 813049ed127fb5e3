"""AWQ: the scale and clip searches never increase the error they minimise; folds keep the float model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.errors import StageError
from compress.quant.algorithms.awq import (
    AWQConfig,
    awq_quantize_model,
    awq_search_clip,
    awq_search_scale,
    fold_scale,
)
from compress.quant.algorithms.rtn import rtn_quantize
from compress.quant.primitives.weight import WeightQuantConfig

from .conftest import calib_batches, correlated_inputs, make_tiny_llama


@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_scale_search_never_worse_than_rtn(group: int, symmetric: bool) -> None:
    torch.manual_seed(0)
    x = correlated_inputs(1024, 128)
    ws = [torch.randn(32, 128), torch.randn(16, 128)]
    s, best, rtn_err = awq_search_scale(x, ws, AWQConfig(group_size=group, symmetric=symmetric))
    w = torch.cat(ws)
    direct = float(
        (x @ w.T - x @ rtn_quantize(w, WeightQuantConfig(group_size=group, symmetric=symmetric)).dequantize().T)
        .pow(2)
        .mean()
    )
    torch.testing.assert_close(rtn_err, direct, rtol=1e-5, atol=0)  # alpha = 0 is exactly RTN
    assert best <= rtn_err
    assert s.shape == (128,) and bool(torch.all(s > 0))


def test_clip_search_never_worse_per_group() -> None:
    torch.manual_seed(0)
    x = correlated_inputs(512, 64)
    w = torch.randn(8, 64)
    w[0, 3] = 12.0  # an outlier weight that clipping should tame
    cfg = AWQConfig(group_size=32)
    clipped = awq_search_clip(x, w, cfg)
    per_row = WeightQuantConfig(group_size=-1)
    for start in (0, 32):
        xs, ws, cs = x[:, start : start + 32], w[:, start : start + 32], clipped[:, start : start + 32]
        e_plain = (xs @ ws.T - xs @ rtn_quantize(ws, per_row).dequantize().T).pow(2).mean(0)
        e_clip = (xs @ ws.T - xs @ rtn_quantize(cs, per_row).dequantize().T).pow(2).mean(0)
        assert torch.all(e_clip <= e_plain * (1 + 1e-5))  # ratio 1 (no clip) is in the grid


def test_fold_keeps_float_model() -> None:
    """Dividing the RMSNorm weight by s and multiplying q/k/v columns by s leaves logits unchanged."""
    model = make_tiny_llama(0)
    ids = calib_batches(1)[0]
    with torch.no_grad():
        ref = model(ids).logits
        s = torch.rand(64) * 3 + 0.2
        layer = model.model.layers[0]
        fold_scale(layer.input_layernorm, s)
        for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            p.weight.mul_(s)
        s2 = torch.rand(128) + 0.5
        fold_scale(layer.mlp.up_proj, s2)
        layer.mlp.down_proj.weight.mul_(s2)
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-5)  # float reassociation only


def test_awq_model_on_tiny_llama() -> None:
    model = make_tiny_llama(0)
    qws = awq_quantize_model(model, calib_batches(4), config=AWQConfig(group_size=32, n_grid=10))
    assert len(qws) == 14
    modules = dict(model.named_modules())
    for name, qw in qws.items():
        assert torch.equal(modules[name].weight, qw.dequantize())


def test_awq_gptq_quantizer_and_refusal() -> None:
    model = make_tiny_llama(0)
    qws = awq_quantize_model(model, calib_batches(2), config=AWQConfig(group_size=32, quantizer="gptq", clip=False))
    assert len(qws) == 14
    with pytest.raises(StageError, match="architecture map"):
        awq_quantize_model(nn.Sequential(nn.Linear(4, 4)), [torch.zeros(1, 4)])
