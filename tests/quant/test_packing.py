"""Byte layouts: MatMulNBits, blocked INT4 DequantizeLinear, GPTQ v1/v2: exact round-trips, known bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compress.quant.algorithms.gptq import GPTQConfig, gptq_quantize_weight
from compress.quant.algorithms.rtn import rtn_quantize
from compress.quant.primitives.packing import (
    GPTQTensors,
    pack_dq_int4,
    pack_gptq,
    pack_matmul_nbits,
    pack_nibbles,
    unpack_dq_int4,
    unpack_gptq,
    unpack_matmul_nbits,
    unpack_nibbles,
)
from compress.quant.primitives.weight import QuantizedWeight, WeightQuantConfig

from .conftest import correlated_inputs


def _same(a: QuantizedWeight, b: QuantizedWeight, scales_fp16: bool = False) -> None:
    assert torch.equal(a.qweight, b.qweight)
    assert torch.equal(a.zeros, b.zeros)
    sa = a.scales.half().float() if scales_fp16 else a.scales
    assert torch.equal(sa, b.scales)
    assert torch.equal(a.group_index(), b.group_index())


def test_nibble_order_low_first() -> None:
    assert pack_nibbles(np.array([1, 2, 15, 0, 7], np.uint8)).tolist() == [0x21, 0x0F, 0x07]
    assert unpack_nibbles(np.array([0x21, 0x0F], np.uint8), 3).tolist() == [1, 2, 15]


@pytest.mark.parametrize("in_f,group", [(128, 32), (576, 128), (96, 64), (160, 32), (80, -1)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_nbits_round_trip(in_f: int, group: int, symmetric: bool, bits: int) -> None:
    torch.manual_seed(0)
    qw = rtn_quantize(torch.randn(24, in_f), WeightQuantConfig(bits=bits, group_size=group, symmetric=symmetric))
    t = pack_matmul_nbits(qw)
    nb = -(-in_f // t.block_size)
    assert t.B.shape == (24, nb, t.block_size * bits // 8) and t.B.dtype == np.uint8
    assert t.scales.shape == (24 * nb,)
    if symmetric:
        assert t.zero_points is None  # default zero point 2**(bits-1)
    else:
        assert t.zero_points.shape == ((24 * -(-nb // 2),) if bits == 4 else (24 * nb,))
    if in_f % t.block_size:  # padding codes are zeros
        codes = unpack_nibbles(t.B, t.block_size) if bits == 4 else t.B
        assert not codes.reshape(24, -1)[:, in_f:].any()
    _same(qw, unpack_matmul_nbits(t, group_size=group))


@pytest.mark.parametrize("in_f,group", [(128, 32), (96, 64), (576, 128)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dq_int4_round_trip(in_f: int, group: int, symmetric: bool) -> None:
    torch.manual_seed(1)
    qw = rtn_quantize(torch.randn(16, in_f), WeightQuantConfig(group_size=group, symmetric=symmetric))
    t = pack_dq_int4(qw)
    assert t.signed == symmetric and t.data.nbytes == in_f * 16 // 2
    assert t.scale.shape == (-(-in_f // group), 16)
    _same(qw, unpack_dq_int4(t))


def test_dq_signed_values() -> None:
    """Symmetric code q is stored as the signed nibble q - 8 (two's complement)."""
    qw = QuantizedWeight(
        torch.tensor([[0, 8, 15, 7] * 4], dtype=torch.uint8),
        torch.ones(1, 1),
        torch.full((1, 1), 8, dtype=torch.uint8),
        16,
        4,
        symmetric=True,
    )
    t = pack_dq_int4(qw)  # (K=16, N=1): values -8, 0, 7, -1 ...
    assert t.data[:2].tolist() == [0x08, 0xF7]


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_format_round_trip(fmt: str, symmetric: bool) -> None:
    torch.manual_seed(2)
    w = torch.randn(32, 96)
    qw = rtn_quantize(w, WeightQuantConfig(group_size=64, symmetric=symmetric))  # partial last group
    if fmt == "gptq" and bool((qw.zeros == 0).any()):
        pytest.skip("zero point 0 present")  # covered by test_gptq_v1_refuses_zero_point_zero
    t = pack_gptq(qw, fmt)
    assert t.qweight.shape == (96 // 8, 32) and t.qweight.dtype == np.int32
    assert t.qzeros.shape == (2, 32 // 8) and t.scales.dtype == np.float16
    assert t.g_idx.tolist() == [i // 64 for i in range(96)]
    _same(qw, unpack_gptq(t, 64, symmetric, fmt), scales_fp16=True)


def test_gptq_v1_stores_zero_minus_one() -> None:
    """AutoGPTQ v1: a symmetric zero point 8 is stored as 7 in every nibble (0x77777777)."""
    qw = rtn_quantize(torch.randn(8, 32), WeightQuantConfig(group_size=32, symmetric=True))
    assert pack_gptq(qw, "gptq").qzeros.view(np.uint32).tolist() == [[0x77777777]]
    assert pack_gptq(qw, "gptq_v2").qzeros.view(np.uint32).tolist() == [[0x88888888]]
    # Known layout of qweight: row 8i+j of in_features in bits 4j..4j+3
    t = pack_gptq(qw, "gptq_v2")
    codes = qw.qweight.numpy().T  # (K, N)
    expect = sum(int(codes[j, 0]) << (4 * j) for j in range(8))
    assert int(t.qweight.view(np.uint32)[0, 0]) == expect


def test_gptq_v1_refuses_zero_point_zero() -> None:
    w = torch.rand(8, 32)  # all positive -> asymmetric zero point 0
    qw = rtn_quantize(w, WeightQuantConfig(group_size=32, symmetric=False))
    assert bool((qw.zeros == 0).all())
    with pytest.raises(ValueError, match="gptq_v2"):  # a caller's mistake (library API), not a pipeline file's
        pack_gptq(qw, "gptq")
    _same(qw, unpack_gptq(pack_gptq(qw, "gptq_v2"), 32, False, "gptq_v2"), scales_fp16=True)


def test_gptq_act_order_g_idx_round_trip() -> None:
    torch.manual_seed(3)
    x = correlated_inputs(512, 64)
    qw = gptq_quantize_weight(
        torch.randn(16, 64), 2 * x.T @ x / 512, GPTQConfig(group_size=16, act_order=True, static_groups=False)
    )
    assert qw.g_idx is not None and not qw.has_trivial_g_idx()
    t = pack_gptq(qw, "gptq_v2")
    back = unpack_gptq(GPTQTensors(t.qweight, t.qzeros, t.scales, t.g_idx), 16, False, "gptq_v2")
    _same(qw, back, scales_fp16=True)
    assert torch.equal(back.g_idx, qw.g_idx)
