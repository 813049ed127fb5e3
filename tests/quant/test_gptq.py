"""GPTQ: Hessian accumulation, error vs RTN on correlated inputs, act-order/g_idx, model-level drivers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.quant.algorithms.gptq import GPTQConfig, HessianAccumulator, gptq_quantize_model, gptq_quantize_weight
from compress.quant.algorithms.rtn import rtn_quantize, rtn_quantize_model
from compress.quant.primitives.weight import WeightQuantConfig

from .conftest import calib_batches, correlated_inputs, make_tiny_llama


def _out_err(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ w.T - x @ wq.T).pow(2).mean())


def test_hessian_is_two_x_xt_over_n() -> None:
    x = correlated_inputs(1000, 32)
    acc = HessianAccumulator(32)
    for chunk in x.split(300):  # uneven chunks: running mean must still be exact
        acc.add(chunk)
    torch.testing.assert_close(acc.H, 2 * x.T @ x / 1000, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group", [32, 64, -1])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order,static", [(False, True), (True, True), (True, False)])
def test_gptq_beats_rtn_on_held_out_correlated_inputs(
    group: int, symmetric: bool, act_order: bool, static: bool
) -> None:
    """Measured ratio GPTQ/RTN layer-output MSE is 0.06-0.09 here; we require < 0.25 on held-out data."""
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = correlated_inputs(2048, 128)
    x_test = correlated_inputs(1024, 128, sample_seed=5)
    acc = HessianAccumulator(128)
    acc.add(x)
    cfg = GPTQConfig(group_size=group, symmetric=symmetric, act_order=act_order, static_groups=static)
    qw = gptq_quantize_weight(w, acc.H, cfg)
    rtn = rtn_quantize(w, WeightQuantConfig(group_size=group, symmetric=symmetric)).dequantize()
    assert _out_err(w, qw.dequantize(), x_test) < 0.25 * _out_err(w, rtn, x_test)
    assert qw.has_trivial_g_idx() == (not act_order or static or group == -1)


def test_gptq_partial_last_group_and_dead_columns() -> None:
    torch.manual_seed(0)
    x = correlated_inputs(1024, 96)
    x[:, 5] = 0.0  # a dead input channel: its weight is zeroed, as in the reference code
    acc = HessianAccumulator(96)
    acc.add(x)
    qw = gptq_quantize_weight(torch.randn(16, 96), acc.H, GPTQConfig(group_size=64))
    assert qw.n_groups == 2
    assert torch.all(qw.dequantize()[:, 5] == 0)


def test_gptq_model_sequential_on_tiny_llama() -> None:
    model = make_tiny_llama(0)
    ref = make_tiny_llama(0)
    seen: list[tuple[int, int]] = []
    qws = gptq_quantize_model(
        model,
        calib_batches(4),
        config=GPTQConfig(group_size=32),
        progress=lambda d, t, _m: seen.append((d, t)),
    )
    assert seen == [(1, 2), (2, 2)]
    expected = {n for n, m in ref.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert set(qws) == expected  # 2 layers x 7 Linears; lm_head left alone by default
    modules = dict(model.named_modules())
    for name, qw in qws.items():
        assert torch.equal(modules[name].weight, qw.dequantize())  # model holds the dequantized weights
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)
    # Held-out tokens: GPTQ's logits error is below RTN's at the same group size (measured ratio ~0.8
    # on this random model; random weights leave little structure, so the bound is loose: < 0.95).
    rtn_model = make_tiny_llama(0)
    rtn_quantize_model(rtn_model, config=WeightQuantConfig(group_size=32))
    ids = calib_batches(2, seed=9)[0]
    with torch.no_grad():
        ref_logits = ref(ids).logits
        e_gptq = float((model(ids).logits - ref_logits).pow(2).mean())
        e_rtn = float((rtn_model(ids).logits - ref_logits).pow(2).mean())
    assert e_gptq < 0.95 * e_rtn


def test_gptq_model_fallback_without_decoder_layers() -> None:
    """A model without model.model.layers: one pass with hooks on every Linear."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    batches = [{"input": correlated_inputs(256, 64, sample_seed=i)} for i in range(2)]
    wrapper = _KwargsModel(mlp)
    qws = gptq_quantize_model(wrapper, batches, config=GPTQConfig(group_size=32))
    assert set(qws) == {"net.0", "net.2"}


class _KwargsModel(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.net(input)
