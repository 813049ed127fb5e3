"""GPTQ: second-order weight quantization (Frantar et al. 2022, arXiv 2210.17323).

Each Linear is quantized column by column (columns = input features); the rounding error of a
column is spread onto the not-yet-quantized columns through the inverse Hessian ``H = 2 X Xᵀ`` of
the layer-wise objective ``||W X - Q X||²``, using its upper Cholesky factor (paper, Alg. 1), with
lazy block updates of ``block_size`` columns. Qparams of a group are chosen from the *updated*
weights when the group starts (as the reference implementation does), or once up front with
``static_groups`` (so act-order keeps contiguous groups and an export-friendly trivial ``g_idx``).

Written here rather than borrowed: AutoGPTQ is end-of-life and needs CUDA; GPTQModel pins numpy and
breaks across transformers versions; ORT's `matmul_nbits_quantizer` GPTQ path failed on small
shapes when tried on this project's CPU machine.

Usage::

    qws = gptq_quantize_model(model, batches, config=GPTQConfig(group_size=128))
    # model's Linear weights now hold the dequantized values; qws maps names -> QuantizedWeight
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from pydantic import Field
from torch import nn

from compress.errors import StageError
from compress.families.causal_lm.archs import find_arch
from compress.quant.algorithms.sequential import (
    LinearFilter,
    Progress,
    all_linears,
    as_model_kwargs,
    capture_module_inputs,
    default_filter,
    layer_linear_groups,
    run_layer,
    walk_layers,
)
from compress.quant.primitives.qparams import check_bits_group, choose_qparams, quantize_codes
from compress.quant.primitives.weight import QuantizedWeight, WeightQuantConfig


class GPTQConfig(WeightQuantConfig):
    """GPTQ options (adds to bits / group_size / symmetric).

    YAML: ``{method: gptq, group_size: 128, act_order: true, static_groups: true, percdamp: 0.01}``
    """

    percdamp: float = Field(0.01, gt=0.0, le=1.0, description="Dampening added to diag(H), as a fraction of its mean.")
    block_size: int = Field(128, ge=1, description="Columns per lazy batch update (paper: 128).")
    act_order: bool = Field(
        True,
        description="Quantize columns by decreasing diag(H) (desc_act); SmolLM2 g128 ppl 17.9 -> 16.6 with it.",
    )
    static_groups: bool = Field(
        True, description="With act_order: fix group qparams up front so groups stay contiguous (no g_idx)."
    )
    true_sequential: bool = Field(
        True,
        description="Inside a decoder layer, quantize q/k/v, o, gate/up, down in turn on updated inputs.",
    )


class HessianAccumulator:
    """Running ``H = 2/n Σ x xᵀ`` over the rows of a Linear's inputs (float32 ``[in, in]``)."""

    def __init__(self, in_features: int) -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x


def gptq_quantize_weight(weight: torch.Tensor, H: torch.Tensor, config: GPTQConfig | None = None) -> QuantizedWeight:
    """GPTQ on one weight ``[out, in]`` with Hessian ``H`` ``[in, in]`` (paper Alg. 1 + groups, act-order)."""
    cfg = config or GPTQConfig()
    check_bits_group(cfg.bits, cfg.group_size)
    W = weight.detach().clone().float()  # (out, in)
    out_f, cols = W.shape
    H = H.detach().clone().float()
    if H.shape != (cols, cols):
        raise StageError(f"Hessian shape {tuple(H.shape)} does not match weight in_features {cols}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    g = cols if cfg.group_size == -1 else cfg.group_size
    ngroups = -(-cols // g)

    static: list[tuple[torch.Tensor, torch.Tensor]] = []
    if cfg.group_size == -1:
        static = [choose_qparams(W, cfg.bits, cfg.symmetric)]
    elif cfg.static_groups and cfg.act_order:
        static = [choose_qparams(W[:, s : s + g], cfg.bits, cfg.symmetric) for s in range(0, cols, g)]

    perm = torch.argsort(torch.diag(H), descending=True) if cfg.act_order else torch.arange(cols)
    W = W[:, perm]
    H = H[perm][:, perm]

    damp = cfg.percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(cols)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError as e:  # torch raises _LinAlgError (a RuntimeError) when H is not PD
        raise StageError(f"Hessian not positive definite even after dampening {cfg.percdamp}; raise percdamp") from e

    codes = torch.zeros_like(W)
    scales = torch.zeros(out_f, ngroups)
    zeros = torch.zeros(out_f, ngroups)
    gidx_perm = torch.zeros(cols, dtype=torch.long)  # group of each permuted column
    block = max(cfg.block_size, g) if cfg.group_size != -1 else cfg.block_size
    if cfg.group_size != -1 and block % g:
        block = g * (-(-block // g))  # groups never straddle blocks
    scale = zero = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if cfg.group_size == -1:
                scale, zero = static[0]
                gi = 0
            elif static:
                gi = int(perm[c]) // g
                scale, zero = static[gi]
            else:
                gi = c // g
                if c % g == 0:
                    scale, zero = choose_qparams(W1[:, i : i + g], cfg.bits, cfg.symmetric)
                    scales[:, gi], zeros[:, gi] = scale, zero
            gidx_perm[c] = gi
            w = W1[:, i]
            q_code = quantize_codes(w, scale, zero, cfg.bits)
            q = (q_code - zero) * scale
            codes[:, c] = q_code
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if static:
        for gi, (s, z) in enumerate(static):
            scales[:, gi], zeros[:, gi] = s, z
    inv = torch.argsort(perm)
    codes = codes[:, inv]
    g_idx = gidx_perm[inv].to(torch.int32)
    trivial = cfg.group_size == -1 or not cfg.act_order or bool(cfg.static_groups)
    return QuantizedWeight(
        qweight=codes.to(torch.uint8),
        scales=scales,
        zeros=zeros.to(torch.uint8),
        group_size=cfg.group_size,
        bits=cfg.bits,
        symmetric=cfg.symmetric,
        g_idx=None if trivial else g_idx,
    )


def quantize_with_hooks(
    runner: Any, members: list[tuple[str, nn.Linear]], cfg: GPTQConfig
) -> dict[str, QuantizedWeight]:
    """Collect Hessians of ``members`` while ``runner()`` runs, then GPTQ each and write back."""
    accs = {name: HessianAccumulator(mod.in_features) for name, mod in members}
    handles = [mod.register_forward_hook(lambda _m, inp, _out, a=accs[name]: a.add(inp[0])) for name, mod in members]
    try:
        runner()
    finally:
        for h in handles:
            h.remove()
    result: dict[str, QuantizedWeight] = {}
    for name, mod in members:
        if accs[name].n == 0:
            raise StageError(f"{name}: no calibration activation reached this layer")
        qw = gptq_quantize_weight(mod.weight, accs[name].H, cfg)
        with torch.no_grad():
            mod.weight.copy_(qw.dequantize(mod.weight.dtype))
        result[name] = qw
    return result


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    calib_batches: Iterable[Any],
    *,
    layers_filter: LinearFilter | None = None,
    config: GPTQConfig | None = None,
    progress: Progress | None = None,
) -> dict[str, QuantizedWeight]:
    """GPTQ every selected Linear of ``model``; returns ``{module name: QuantizedWeight}``.

    Decoders with an architecture map (`compress.families.causal_lm.archs`) are done decoder layer by
    decoder layer on inputs produced by the already-quantized layers, each layer with the arguments the
    model gives it, its Linears in the map's sequential groups; other models in one pass with hooks on all
    Linears.
    The model is modified in place: each quantized Linear's weight becomes its dequantized value.
    ``layers_filter(name, module)`` selects Linears (default: all but ``lm_head``).
    ``progress(done, total, message)`` is called after each layer. A batch is a token tensor, a mapping
    of model kwargs, or (models without decoder layers) a tuple of positional inputs.
    """
    cfg = config or GPTQConfig()
    keep = layers_filter or default_filter
    batches = list(calib_batches)
    if not batches:
        raise StageError("GPTQ needs calibration batches; got none")
    result: dict[str, QuantizedWeight] = {}
    arch = find_arch(model)
    if arch is None:
        members = all_linears(model, keep)
        if not members:
            raise StageError("no Linear layer selected for GPTQ")

        def run_all() -> None:
            for b in batches:  # a tuple is positional inputs (e.g. images of a CNN), else model kwargs
                model(*b) if isinstance(b, tuple) else model(**as_model_kwargs(b))

        result.update(quantize_with_hooks(run_all, members, cfg))
        if progress:
            progress(1, 1, f"GPTQ {len(members)} Linear layers (one pass)")
        return result

    n_layers = len(model.get_submodule(arch.layers))
    for i, prefix, layer, inputs in walk_layers(model, arch, batches):
        groups = layer_linear_groups(layer, arch, keep, prefix)
        if not cfg.true_sequential and groups:
            groups = [[m for grp in groups for m in grp]]
        for members in groups:
            result.update(
                quantize_with_hooks(lambda layer=layer, inputs=inputs: run_layer(layer, inputs), members, cfg)
            )
        if progress:
            progress(i + 1, n_layers, f"GPTQ decoder layer {i}")
    return result


@torch.no_grad()
def gptq_quantize_head(
    model: nn.Module, calib_batches: Iterable[Any], name: str, config: GPTQConfig | None = None
) -> QuantizedWeight:
    """GPTQ the output projection ``name`` on its own calibration inputs; its weight becomes the dequantized one.

    Run after the decoder layers are quantized: the head's Hessian comes from the final norm's outputs of
    the quantized body (what the shipped file feeds it). A tied embedding shares the weight, so the table is
    quantized once for both uses; its error is minimised for the head's inputs only (an embedding row is
    read, not multiplied, so it has no input statistics to weigh the columns by). AWQ scaling cannot be
    applied here: the scale would have to be folded into the table, which the tied embedding also reads.
    """
    cfg = config or GPTQConfig()
    head = model.get_submodule(name)
    if not isinstance(head, nn.Linear):
        raise StageError(f"{name}: {type(head).__name__}, not a Linear; GPTQ of the head needs nn.Linear")
    acc = HessianAccumulator(head.in_features)
    if capture_module_inputs(model, head, calib_batches, acc.add) == 0 or acc.n == 0:
        raise StageError(f"{name}: no calibration activation reached the output projection")
    qw = gptq_quantize_weight(head.weight, acc.H, cfg)
    head.weight.copy_(qw.dequantize(head.weight.dtype))
    return qw
