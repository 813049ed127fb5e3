"""The value every INT4 algorithm returns: codes, scales and zero points of one Linear weight."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from compress.quant.primitives.qparams import ALLOWED_BITS, check_bits_group, column_groups, n_groups


class WeightQuantConfig(BaseModel):
    """How one weight is quantized (shared by RTN, GPTQ and AWQ).

    YAML (as the `quantize` stage would pass it): ``{bits: 4, group_size: 128, symmetric: false}``
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(4, description="Code width: 4 (default) or 8 (for per-layer overrides).")
    group_size: int = Field(
        128, description="Columns of in_features sharing one scale/zero: a power of two >= 16, or -1 per row."
    )
    symmetric: bool = Field(
        False, description="Symmetric codes (zero point fixed at 2**(bits-1)); needed for TensorRT INT4."
    )

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in ALLOWED_BITS:
            raise ValueError(f"bits = {v}; allowed: {', '.join(map(str, ALLOWED_BITS))}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        check_bits_group(4, v)
        return v


@dataclass(frozen=True)
class QuantizedWeight:
    """A group-quantized Linear weight ``[out_features, in_features]``.

    qweight: uint8 ``[out, in]`` codes ``0 .. 2**bits-1`` (unpacked; packers pack them per format).
    scales: float32 ``[out, n_groups]``.  zeros: uint8 ``[out, n_groups]`` (all ``2**(bits-1)`` if symmetric).
    g_idx: int32 ``[in]`` group of each input column, or None for contiguous groups (``i // group_size``);
    GPTQ with act-order and without static groups produces a non-trivial one.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    bits: int
    symmetric: bool = False
    g_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_bits_group(self.bits, self.group_size)
        out_f, in_f = self.qweight.shape
        ng = n_groups(in_f, self.group_size) if self.g_idx is None else int(self.g_idx.max()) + 1
        if self.qweight.dtype != torch.uint8:
            raise ValueError(f"qweight dtype = {self.qweight.dtype}; allowed: torch.uint8")
        if tuple(self.scales.shape) != (out_f, ng) or tuple(self.zeros.shape) != (out_f, ng):
            raise ValueError(
                f"scales {tuple(self.scales.shape)} / zeros {tuple(self.zeros.shape)} do not match "
                f"qweight {tuple(self.qweight.shape)} with group_size {self.group_size} ({ng} groups)"
            )
        if self.g_idx is not None and tuple(self.g_idx.shape) != (in_f,):
            raise ValueError(f"g_idx shape {tuple(self.g_idx.shape)}; expected ({in_f},)")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)  # type: ignore[return-value]

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    def group_index(self) -> torch.Tensor:
        """Group of each input column (int64 ``[in]``), explicit g_idx or contiguous."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return column_groups(self.qweight.shape[1], self.group_size)

    def has_trivial_g_idx(self) -> bool:
        """True when groups are contiguous blocks (what MatMulNBits and DequantizeLinear expect)."""
        if self.g_idx is None:
            return True
        return bool(torch.equal(self.g_idx.long(), column_groups(self.qweight.shape[1], self.group_size)))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(q - zero) * scale`` per column's group -> float ``[out, in]``."""
        gi = self.group_index()
        q = self.qweight.float()
        w = (q - self.zeros.float()[:, gi]) * self.scales.float()[:, gi]
        return w.to(dtype)
