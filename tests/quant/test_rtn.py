"""RTN math: error bound, code range, symmetric zero point, partial last group, config validation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from compress.quant.algorithms.rtn import rtn_quantize
from compress.quant.primitives.qparams import column_groups
from compress.quant.primitives.weight import QuantizedWeight, WeightQuantConfig


@pytest.mark.parametrize("in_f,group", [(128, 32), (128, 64), (576, 128), (96, 64), (100, -1)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_error_within_half_step(in_f: int, group: int, symmetric: bool, bits: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(48, in_f) * torch.rand(48, 1) * 3
    qw = rtn_quantize(w, WeightQuantConfig(bits=bits, group_size=group, symmetric=symmetric))
    n_groups = 1 if group == -1 else -(-in_f // group)
    assert qw.scales.shape == (48, n_groups) and qw.zeros.shape == (48, n_groups)
    assert int(qw.qweight.max()) <= 2**bits - 1
    step = qw.scales[:, column_groups(in_f, group)]
    # Round-to-nearest never clips (the range covers the group): error <= scale/2. Slack 1e-4 steps:
    # w/scale reaches 2**(bits-1) = 128, where float32 rounding is ~1e-5 of a step.
    assert torch.all((w - qw.dequantize()).abs() <= step * (0.5 + 1e-4))
    if symmetric:
        assert torch.all(qw.zeros == 2 ** (bits - 1))


def test_partial_last_group_has_own_qparams() -> None:
    """576 = 4*128 + 64: the short last group gets qparams from its 64 columns only."""
    w = torch.randn(8, 576) * 0.01
    w[:, 512:] *= 100.0
    qw = rtn_quantize(w, WeightQuantConfig(group_size=128))
    assert qw.n_groups == 5
    assert torch.all(qw.scales[:, 4] > 10 * qw.scales[:, :4].max(dim=1).values)


def test_constant_group_is_exact() -> None:
    w = torch.zeros(4, 64)
    qw = rtn_quantize(w, WeightQuantConfig(group_size=32))
    assert torch.equal(qw.dequantize(), w)


def test_config_rejects_unsupported_values() -> None:
    with pytest.raises(ValidationError, match="group_size"):
        WeightQuantConfig(group_size=48)
    with pytest.raises(ValidationError, match="bits"):
        WeightQuantConfig(bits=3)
    with pytest.raises(ValidationError):
        WeightQuantConfig(groupsize=128)  # extra keys are forbidden


def test_quantized_weight_checks_shapes() -> None:
    with pytest.raises(ValueError, match="scales"):
        QuantizedWeight(
            torch.zeros(4, 64, dtype=torch.uint8),
            torch.ones(4, 3),
            torch.zeros(4, 3, dtype=torch.uint8),
            32,
            4,
        )
