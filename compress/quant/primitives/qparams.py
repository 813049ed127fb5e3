"""Group-wise affine quantization math shared by RTN, GPTQ and AWQ (torch only, no I/O).

A weight ``W`` of shape ``[out_features, in_features]`` is cut along ``in_features`` into groups of
``group_size`` columns (``-1`` = one group per row). Each (row, group) gets an unsigned code range
``0 .. 2**bits - 1`` with a scale and an integer zero point::

    q = clamp(round(w / scale) + zero, 0, 2**bits - 1)        w_hat = (q - zero) * scale

Symmetric: ``zero = 2**(bits-1)`` (8 for 4 bits) and ``scale = 2 * absmax / (2**bits - 1)``, the
convention of GPTQ's reference quantizer (arXiv 2210.17323, ``quant.py``): the whole code range is
used, and ``q - 8`` is a signed int4 in ``[-8, 7]`` so the same codes serve TensorRT's signed INT4.
Asymmetric: the range is ``[min(w, 0), max(w, 0)]`` (zero stays exactly representable) and
``zero = round(-min / scale)``. A constant group gets scale 1 instead of 0 (no division by zero).

When ``in_features`` is not a multiple of ``group_size`` (SmolLM2: 576 = 4 x 128 + 64) the last
group is simply shorter; packers that need whole blocks pad codes with zeros (see ``packing``).
"""

from __future__ import annotations

import math

import torch

from compress.quant.scheme import group_size_problem

ALLOWED_BITS = (4, 8)


def check_bits_group(bits: int, group_size: int) -> None:
    """Raise ValueError unless ``bits`` and ``group_size`` are supported (pydantic validators report it by key)."""
    if bits not in ALLOWED_BITS:
        raise ValueError(f"bits = {bits}; allowed: {', '.join(map(str, ALLOWED_BITS))}")
    problem = None if group_size == -1 else group_size_problem(group_size)
    if problem:
        raise ValueError(f"{problem}, or -1 (per row)")


def n_groups(in_features: int, group_size: int) -> int:
    """Number of groups along ``in_features`` (the last one may be shorter)."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def effective_group_size(in_features: int, group_size: int) -> int:
    """Group size with ``-1`` resolved to the full row."""
    return in_features if group_size == -1 else group_size


def column_groups(in_features: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Group index of each input column for contiguous groups: ``i // group_size`` (int64 ``[in]``)."""
    g = effective_group_size(in_features, group_size)
    return torch.arange(in_features, device=device) // g


def choose_qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``w`` (``[rows, cols]``, one group per row).

    Returns ``scale`` float32 ``[rows]`` and ``zero`` float32 ``[rows]`` holding integers.
    """
    maxq = 2**bits - 1
    w = w.float()
    wmin = torch.clamp(w.min(dim=1).values, max=0.0)
    wmax = torch.clamp(w.max(dim=1).values, min=0.0)
    if symmetric:
        absmax = torch.maximum(wmin.abs(), wmax)
        scale = 2.0 * absmax / maxq
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        scale = (wmax - wmin) / maxq
        zero = torch.zeros_like(scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not symmetric:
        zero = torch.clamp(torch.round(-wmin / scale), 0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``clamp(round(w / scale) + zero, 0, maxq)`` as float; scale/zero broadcast against ``w``."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2**bits - 1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize ``w`` with the given (broadcastable) scale and zero."""
    return (quantize_codes(w, scale, zero, bits) - zero) * scale


def group_qparams(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) scale and zero of ``w`` ``[out, in]``: two float32 tensors ``[out, n_groups]``."""
    out_f, in_f = w.shape
    g = effective_group_size(in_f, group_size)
    scales, zeros = [], []
    for start in range(0, in_f, g):
        s, z = choose_qparams(w[:, start : start + g], bits, symmetric)
        scales.append(s)
        zeros.append(z)
    return torch.stack(scales, dim=1), torch.stack(zeros, dim=1)  # (out, n_groups)


def expand_groups(t: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """Per-group tensor ``[out, n_groups]`` -> per-column ``[out, in]`` through ``g_idx`` ``[in]``."""
    return t[:, g_idx.long()]
