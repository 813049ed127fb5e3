"""Byte layouts of a QuantizedWeight in the three formats we read or write (numpy, no ONNX import).

(a) ONNX Runtime ``com.microsoft.MatMulNBits`` (contrib op spec, onnxruntime/docs/ContribOperators.md):
    ``Y = A @ dequant(B)ᵀ`` with ``B`` uint8 ``[N, n_blocks, blob_size]``, ``blob_size = block_size*bits/8``,
    codes packed along K low nibble first; ``scales`` ``[N * n_blocks]``; ``zero_points`` uint8
    ``[N * ceil(n_blocks*bits/8)]`` packed the same way per row (default ``2**(bits-1)`` when absent).
    ``K`` that is not a multiple of ``block_size`` is padded with zero codes up to whole blocks: the
    padded codes multiply nothing (A has only K columns), so any value would do; zeros keep files
    reproducible.
(b) ONNX opset-21 ``DequantizeLinear`` with blocked INT4 weights: the MatMul's B input ``[K, N]`` as
    ``INT4`` (signed, symmetric, no zero point: TensorRT's INT4 weight-only rule) or ``UINT4`` with a
    ``UINT4`` zero point (asymmetric), ``axis=0``, ``block_size=group_size``, scale ``[ceil(K/bs), N]``.
    4-bit tensors are stored two per byte, element 0 in the low nibble (onnx IR spec, "INT4").
(c) AutoGPTQ / GPTQModel checkpoints: ``qweight`` int32 ``[K/8, N]`` (8 codes of consecutive input
    rows per int32, row ``8i+j`` in bits ``4j..4j+3``), ``qzeros`` int32 ``[n_groups, N/8]`` packed the
    same way along N, ``scales`` fp16 ``[n_groups, N]``, ``g_idx`` int32 ``[K]``.
    ``checkpoint_format``: ``gptq`` (v1, AutoGPTQ) stores ``zero - 1`` -- a historic off-by-one that
    every v1 loader undoes by adding 1, so a true zero point of 0 cannot be stored (it would read back
    as 16); ``gptq_v2`` (GPTQModel's internal format) stores the zero point as is.

Hand-written rather than borrowed: AutoGPTQ is end-of-life and needs CUDA, GPTQModel pins numpy, and
ORT's own packer lives inside its quantizer classes; each layout here is a few reshapes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from compress.quant.primitives.qparams import column_groups, n_groups
from compress.quant.primitives.weight import QuantizedWeight

GPTQ_FORMATS = ("gptq", "gptq_v2")


# --------------------------------------------------------------------------- nibble helpers
def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit values along the last axis, two per byte, element 0 in the low nibble."""
    codes = np.asarray(codes).astype(np.uint8) & 0x0F
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, length: int) -> np.ndarray:
    """Inverse of ``pack_nibbles``: ``[..., ceil(length/2)]`` bytes -> ``[..., length]`` uint8 values."""
    packed = np.asarray(packed, dtype=np.uint8)
    out = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))
    return out[..., :length]


def _require_contiguous_groups(qw: QuantizedWeight, fmt: str) -> None:
    if not qw.has_trivial_g_idx():
        raise ValueError(
            f"{fmt} needs contiguous groups but this weight has an act-order g_idx; quantize with "
            "static_groups=True (or desc_act off), or let onnx_rewrite permute the input columns"
        )


def matmul_nbits_block_size(in_features: int, group_size: int) -> int:
    """MatMulNBits block size: the group size, or for per-row groups the next power of two >= K."""
    if group_size != -1:
        return group_size
    return max(16, 1 << (in_features - 1).bit_length())


# --------------------------------------------------------------------------- (a) MatMulNBits
@dataclass(frozen=True)
class MatMulNBitsTensors:
    """Initializers and attributes of one MatMulNBits node (layout of the module docstring, (a))."""

    B: np.ndarray  # uint8 (N, n_blocks, blob_size)
    scales: np.ndarray  # float32 (N * n_blocks,)
    zero_points: np.ndarray | None  # uint8 packed, None when symmetric (default 2**(bits-1))
    K: int
    N: int
    bits: int
    block_size: int


def pack_matmul_nbits(qw: QuantizedWeight) -> MatMulNBitsTensors:
    """Pack ``qw`` for ``com.microsoft.MatMulNBits`` (contiguous groups only)."""
    _require_contiguous_groups(qw, "MatMulNBits")
    n, k = qw.shape
    bs = matmul_nbits_block_size(k, qw.group_size)
    nb = -(-k // bs)
    if qw.n_groups != nb:
        raise ValueError(f"{qw.n_groups} groups but MatMulNBits expects {nb} blocks of {bs} for K={k}")
    codes = np.zeros((n, nb * bs), np.uint8)
    codes[:, :k] = qw.qweight.numpy()
    codes = codes.reshape(n, nb, bs)  # (N, n_blocks, block_size)
    b = pack_nibbles(codes) if qw.bits == 4 else codes  # (N, n_blocks, block_size*bits/8)
    scales = qw.scales.float().numpy().reshape(-1).astype(np.float32)  # (N * n_blocks,)
    zeros = qw.zeros.numpy().astype(np.uint8)  # (N, n_blocks)
    if int(zeros.max()) >= 2**qw.bits:
        raise ValueError(f"zero point {int(zeros.max())} does not fit in {qw.bits} bits")
    if qw.symmetric and np.all(zeros == 2 ** (qw.bits - 1)):
        zp = None
    elif qw.bits == 4:
        zp = pack_nibbles(zeros).reshape(-1)  # (N * ceil(n_blocks/2),)
    else:
        zp = zeros.reshape(-1)
    return MatMulNBitsTensors(b, scales, zp, k, n, qw.bits, bs)


def unpack_matmul_nbits(t: MatMulNBitsTensors, group_size: int | None = None) -> QuantizedWeight:
    """Inverse of ``pack_matmul_nbits``; ``group_size`` -1 restores a per-row weight."""
    n, k, bs, bits = t.N, t.K, t.block_size, t.bits
    nb = -(-k // bs)
    b = t.B.reshape(n, nb, -1)
    codes = unpack_nibbles(b, bs) if bits == 4 else b  # (N, n_blocks, block_size)
    codes = codes.reshape(n, nb * bs)[:, :k]
    if t.zero_points is None:
        zeros = np.full((n, nb), 2 ** (bits - 1), np.uint8)
    elif bits == 4:
        zeros = unpack_nibbles(t.zero_points.reshape(n, -1), nb)
    else:
        zeros = t.zero_points.reshape(n, nb)
    return QuantizedWeight(
        qweight=torch.from_numpy(np.ascontiguousarray(codes)),
        scales=torch.from_numpy(t.scales.reshape(n, nb).astype(np.float32)),
        zeros=torch.from_numpy(np.ascontiguousarray(zeros)),
        group_size=bs if group_size is None else group_size,
        bits=bits,
        symmetric=t.zero_points is None,
    )


# --------------------------------------------------------------------------- (b) INT4 DequantizeLinear
@dataclass(frozen=True)
class BlockedDQTensors:
    """Packed data of a blocked 4-bit DequantizeLinear for a MatMul B ``[K, N]`` (axis 0)."""

    data: np.ndarray  # uint8 packed bytes of the [K, N] 4-bit tensor, row-major
    signed: bool  # INT4 (True) or UINT4 (False)
    scale: np.ndarray  # float32 (ceil(K/bs), N)
    zero_point: np.ndarray | None  # packed uint8 bytes of UINT4 (ceil(K/bs), N), None when signed
    K: int
    N: int
    block_size: int


def pack_dq_int4(qw: QuantizedWeight) -> BlockedDQTensors:
    """Lay out ``qw`` (4 bits) as DequantizeLinear inputs for ``MatMul(A, DQ(B))``, B = Wᵀ ``[K, N]``.

    Symmetric weights become signed INT4 (``q - 8`` in ``[-8, 7]``) without zero point; asymmetric
    ones UINT4 with a UINT4 zero point.
    """
    _require_contiguous_groups(qw, "DequantizeLinear INT4")
    if qw.bits != 4:
        raise ValueError(f"bits = {qw.bits}; blocked DequantizeLinear here supports 4 bits only")
    n, k = qw.shape
    bs = k if qw.group_size == -1 else qw.group_size
    codes_t = qw.qweight.numpy().T  # (K, N)
    scale = np.ascontiguousarray(qw.scales.float().numpy().T.astype(np.float32))  # (n_groups, N)
    if qw.symmetric:
        if not np.all(qw.zeros.numpy() == 8):
            raise ValueError("a symmetric weight must have zero point 8 everywhere")
        signed = (codes_t.astype(np.int16) - 8).astype(np.int8)
        return BlockedDQTensors(pack_nibbles(signed.reshape(-1)), True, scale, None, k, n, bs)
    zp = np.ascontiguousarray(qw.zeros.numpy().T)  # (n_groups, N)
    return BlockedDQTensors(pack_nibbles(codes_t.reshape(-1)), False, scale, pack_nibbles(zp.reshape(-1)), k, n, bs)


def unpack_dq_int4(t: BlockedDQTensors) -> QuantizedWeight:
    """Inverse of ``pack_dq_int4``."""
    k, n = t.K, t.N
    ng = -(-k // t.block_size)
    codes = unpack_nibbles(t.data, k * n).reshape(k, n)  # (K, N)
    if t.signed:
        codes = (codes.astype(np.int16) ^ 8).astype(np.uint8)  # two's-complement nibble -> q = s + 8
        zeros = np.full((n, ng), 8, np.uint8)
    else:
        zeros = unpack_nibbles(t.zero_point, ng * n).reshape(ng, n).T
    return QuantizedWeight(
        qweight=torch.from_numpy(np.ascontiguousarray(codes.T)),
        scales=torch.from_numpy(np.ascontiguousarray(t.scale.T)),
        zeros=torch.from_numpy(np.ascontiguousarray(zeros)),
        group_size=-1 if t.block_size == k and ng == 1 else t.block_size,
        bits=4,
        symmetric=t.signed,
    )


# --------------------------------------------------------------------------- (c) GPTQ checkpoints
def _pack_int32_rows(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit ``codes`` ``[R, C]`` along R: int32 ``[R/8, C]``, row 8i+j in bits 4j..4j+3."""
    r, c = codes.shape
    x = codes.astype(np.uint32).reshape(r // 8, 8, c)  # (R/8, 8, C)
    shifts = (np.arange(8, dtype=np.uint32) * 4).reshape(1, 8, 1)
    return np.ascontiguousarray(np.bitwise_or.reduce(x << shifts, axis=1)).view(np.int32)


def _unpack_int32_rows(packed: np.ndarray) -> np.ndarray:
    """Inverse of ``_pack_int32_rows``: int32 ``[R/8, C]`` -> uint8 ``[R, C]``."""
    p = np.asarray(packed).view(np.uint32)[:, None, :]  # (R/8, 1, C)
    shifts = (np.arange(8, dtype=np.uint32) * 4).reshape(1, 8, 1)
    return ((p >> shifts) & 0xF).astype(np.uint8).reshape(-1, packed.shape[1])


@dataclass(frozen=True)
class GPTQTensors:
    """One layer's tensors in an AutoGPTQ/GPTQModel checkpoint (layout (c))."""

    qweight: np.ndarray  # int32 (K/8, N)
    qzeros: np.ndarray  # int32 (n_groups, N/8)
    scales: np.ndarray  # float16 (n_groups, N)
    g_idx: np.ndarray  # int32 (K,)


def shift_zero_points(qw: QuantizedWeight, by: int) -> QuantizedWeight:
    """``qw`` with zero points ``(zero + by) mod 2**bits``.

    onnxruntime-genai's GPTQ loader reads v1 ``qzeros`` and adds 1 modulo ``2**bits``, so a checkpoint
    written for it stores ``shift_zero_points(qw, -1)`` (packed as given: ``pack_gptq(.., "gptq_v2")``) and
    every zero point 0..15 reads back, 0 included (AutoGPTQ v1 cannot store it); ``by=+1`` reads one back.
    """
    levels = 1 << qw.bits
    return replace(qw, zeros=((qw.zeros.to(torch.int16) + by) % levels).to(torch.uint8))


def pack_gptq(qw: QuantizedWeight, checkpoint_format: str = "gptq") -> GPTQTensors:
    """Pack ``qw`` (4 bits) into GPTQ checkpoint tensors; scales are rounded to fp16 (the format's type)."""
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"checkpoint_format = {checkpoint_format!r}; allowed: {', '.join(GPTQ_FORMATS)}")
    if qw.bits != 4:
        raise ValueError(f"bits = {qw.bits}; GPTQ checkpoints are written for 4 bits only here")
    n, k = qw.shape
    if k % 8 or n % 8:
        raise ValueError(f"GPTQ packing needs in and out features divisible by 8, got [{n}, {k}]")
    zeros = qw.zeros.numpy().astype(np.int16)  # (N, n_groups)
    if checkpoint_format == "gptq":
        if np.any(zeros == 0):
            raise ValueError(
                "a zero point of 0 cannot be stored in checkpoint_format 'gptq' (v1 stores zero-1 and "
                "loaders add 1 back); write checkpoint_format 'gptq_v2' instead"
            )
        zeros = zeros - 1
    qweight = _pack_int32_rows(qw.qweight.numpy().T)  # (K/8, N)
    qzeros = np.ascontiguousarray(_pack_int32_rows((zeros & 0xF).astype(np.uint8)).T)  # (n_groups, N/8)
    scales = np.ascontiguousarray(qw.scales.float().numpy().T.astype(np.float16))  # (n_groups, N)
    g_idx = qw.group_index().numpy().astype(np.int32)
    return GPTQTensors(qweight, qzeros, scales, g_idx)


def unpack_gptq(t: GPTQTensors, group_size: int, symmetric: bool, checkpoint_format: str = "gptq") -> QuantizedWeight:
    """Read GPTQ tensors back into a QuantizedWeight (scales widened to float32)."""
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"checkpoint_format = {checkpoint_format!r}; allowed: {', '.join(GPTQ_FORMATS)}")
    codes = _unpack_int32_rows(t.qweight).T  # (N, K)
    n, k = codes.shape
    zeros = _unpack_int32_rows(np.ascontiguousarray(t.qzeros.T)).T.astype(np.int16)  # (n_groups, N)
    if checkpoint_format == "gptq":
        zeros = zeros + 1  # v1 off-by-one; a stored 15 reads as 16, as in AutoGPTQ's kernels
    zeros = zeros[:, :n].T  # (N, n_groups)
    g_idx = torch.from_numpy(t.g_idx.astype(np.int32))
    trivial = (
        group_size != -1
        and int(n_groups(k, group_size)) == t.scales.shape[0]
        and torch.equal(g_idx.long(), column_groups(k, group_size))
    )
    if group_size == -1 and torch.all(g_idx == 0):
        trivial = True
    return QuantizedWeight(
        qweight=torch.from_numpy(np.ascontiguousarray(codes)),
        scales=torch.from_numpy(np.ascontiguousarray(t.scales.astype(np.float32).T)),
        zeros=torch.from_numpy(np.ascontiguousarray(zeros.astype(np.uint8))),
        group_size=group_size,
        bits=4,
        symmetric=symmetric,
        g_idx=None if trivial else g_idx,
    )
