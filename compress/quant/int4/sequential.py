"""Layer-by-layer calibration driver for Llama-style decoders (shared by GPTQ and AWQ).

Why sequential: quantizing decoder layer ``i`` with the activations produced by the already
quantized layers ``0..i-1`` (GPTQ, arXiv 2210.17323, section 4 "sequential") both lowers the
error and bounds memory to one layer's calibration activations. Inputs to layer 0 are captured with
a forward pre-hook that stops the model right there; every later layer's inputs are the previous
layer's outputs, recomputed after it was quantized.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from compress.errors import StageError

LayerInputs = list[tuple[tuple[Any, ...], dict[str, Any]]]
Progress = Callable[[int, int, str], None]
LinearFilter = Callable[[str, nn.Linear], bool]

# Order of the sub-layers inside a Llama decoder layer: each group shares one input.
LLAMA_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass at layer 0."""


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """``model.model.layers`` of a HF Llama-style causal LM, or None when absent."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) > 0 else None


def as_model_kwargs(batch: Any) -> dict[str, Any]:
    """A calibration batch (token tensor ``(B, T)`` or mapping with ``input_ids``) -> model kwargs."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    if isinstance(batch, Mapping):
        return dict(batch)
    raise StageError(f"calibration batch of type {type(batch).__name__}; expected a tensor or a mapping")


def capture_first_layer_inputs(model: nn.Module, calib_batches: Iterable[Any]) -> LayerInputs:
    """Run ``model`` on each batch up to decoder layer 0 and keep that layer's (args, kwargs)."""
    layers = decoder_layers(model)
    if layers is None:
        raise StageError("model has no model.model.layers; sequential calibration needs a decoder")
    captured: LayerInputs = []

    def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args, kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in calib_batches:
                with contextlib.suppress(_Stop):
                    model(**as_model_kwargs(batch), use_cache=False)
    finally:
        handle.remove()
    if not captured:
        raise StageError("no calibration batch reached decoder layer 0 (empty calibration data?)")
    return captured


def layer_output(out: Any) -> torch.Tensor:
    """Hidden states from a decoder layer's return value (tensor, or tuple in older transformers)."""
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> None:
    """Forward every captured input through ``layer`` (hooks collect what they need)."""
    for args, kwargs in inputs:
        layer(*args, **kwargs)


@torch.no_grad()
def propagate(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """Next layer's inputs: same kwargs, hidden states replaced by this layer's outputs."""
    out: LayerInputs = []
    for args, kwargs in inputs:
        hs = layer_output(layer(*args, **kwargs))
        out.append(((hs, *args[1:]), kwargs))
    return out


def layer_linear_groups(layer: nn.Module, keep: LinearFilter, prefix: str) -> list[list[tuple[str, nn.Linear]]]:
    """Linears of one decoder layer in calibration order: Llama groups first, any others after.

    Returns lists of (full name, module); names are ``prefix + local name``.
    """
    named = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    groups: list[list[tuple[str, nn.Linear]]] = []
    seen: set[str] = set()
    for grp in LLAMA_GROUPS:
        members = [(prefix + n, named[n]) for n in grp if n in named and keep(prefix + n, named[n])]
        seen.update(n for n in grp if n in named)
        if members:
            groups.append(members)
    for n, m in named.items():
        if n not in seen and keep(prefix + n, m):
            groups.append([(prefix + n, m)])
    return groups


def all_linears(model: nn.Module, keep: LinearFilter) -> list[tuple[str, nn.Linear]]:
    """Every Linear of ``model`` accepted by ``keep``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and keep(n, m)]


def default_filter(name: str, module: nn.Linear) -> bool:
    """Quantize every Linear except the LM head (kept in float unless asked; it is tied in many LLMs)."""
    return not name.endswith("lm_head")
