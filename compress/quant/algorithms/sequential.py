"""Layer-by-layer calibration driver for mapped decoders (shared by GPTQ and AWQ).

Why sequential: quantizing decoder layer ``i`` with the activations produced by the already
quantized layers ``0..i-1`` (GPTQ, arXiv 2210.17323, section 4 "sequential") both lowers the
error and bounds memory to one layer's calibration activations. Where the layers are and which Linears
share an input come from the decoder's architecture map (`compress.families.causal_lm.archs`).

Every layer gets its own call arguments: one float forward pass records, with a pre-hook on each layer,
what the model passes it (attention mask, rotary embeddings, ...), because layers differ (Gemma 2/3
alternate sliding-window and global layers with different masks and RoPE bases). Only layer 0's hidden
states are kept from that pass; every later layer's hidden states are the previous layer's outputs,
recomputed after it was quantized.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.errors import StageError
from compress.families.causal_lm.archs import DecoderArch

LayerInputs = list[tuple[tuple[Any, ...], dict[str, Any]]]
Progress = Callable[[int, int, str], None]
LinearFilter = Callable[[str, nn.Linear], bool]


class _Stop(Exception):
    """Raised by the capture hook of the last layer: nothing after it is needed."""


@dataclass
class LayerCall:
    """What the model passed one decoder layer for one batch, hidden states left out."""

    args: tuple[Any, ...]  # positional arguments after the hidden states
    kwargs: dict[str, Any]


def as_model_kwargs(batch: Any) -> dict[str, Any]:
    """A calibration batch (token tensor ``(B, T)`` or mapping with ``input_ids``) -> model kwargs."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    if isinstance(batch, Mapping):
        return dict(batch)
    raise StageError(f"calibration batch of type {type(batch).__name__}; expected a tensor or a mapping")


def _split_hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, LayerCall]:
    if args:
        return args[0], LayerCall(tuple(args[1:]), dict(kwargs))
    rest = dict(kwargs)
    return rest.pop("hidden_states"), LayerCall((), rest)


def capture_layer_calls(
    model: nn.Module, layers: nn.ModuleList, calib_batches: Iterable[Any]
) -> tuple[list[torch.Tensor], list[list[LayerCall]]]:
    """One float pass per batch: layer 0's hidden states per batch, and every layer's call per batch.

    Returns ``(hidden, calls)`` with ``calls[layer][batch]``.
    """
    hidden: list[torch.Tensor] = []
    calls: list[list[LayerCall]] = [[] for _ in layers]
    last = len(layers) - 1

    def hook(index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hs, call = _split_hidden(args, kwargs)
        if index == 0:
            hidden.append(hs)
        calls[index].append(call)
        if index == last:
            raise _Stop

    handles = [
        layer.register_forward_pre_hook(lambda _m, a, k, i=i: hook(i, a, k), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            for batch in calib_batches:
                with contextlib.suppress(_Stop):
                    model(**as_model_kwargs(batch), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not hidden:
        raise StageError("no calibration batch reached decoder layer 0 (empty calibration data?)")
    if any(len(c) != len(hidden) for c in calls):
        raise RuntimeError("a decoder layer was not called once per calibration batch")
    return hidden, calls


def capture_module_inputs(
    model: nn.Module, module: nn.Module, calib_batches: Iterable[Any], add: Callable[[torch.Tensor], None]
) -> int:
    """Run ``model`` on each batch until ``module`` is reached; ``add(x)`` gets its first input each time.

    Nothing after ``module`` is computed (for an LM head: no ``(B, T, vocab)`` logits). Returns the number
    of batches that reached it. A tuple batch is positional inputs, anything else model kwargs.
    """

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        add(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    reached = 0
    try:
        with torch.no_grad():
            for batch in calib_batches:
                try:
                    model(*batch) if isinstance(batch, tuple) else model(**as_model_kwargs(batch), use_cache=False)
                except _Stop:
                    reached += 1
    finally:
        handle.remove()
    return reached


def with_hidden(hidden: list[torch.Tensor], calls: list[LayerCall]) -> LayerInputs:
    """(args, kwargs) of each batch's call of one layer, with these hidden states."""
    return [((hs, *call.args), call.kwargs) for hs, call in zip(hidden, calls, strict=True)]


def walk_layers(
    model: nn.Module, arch: DecoderArch, calib_batches: Iterable[Any]
) -> Iterator[tuple[int, str, nn.Module, LayerInputs]]:
    """Yield ``(index, prefix, layer, inputs)`` per decoder layer, in order.

    The caller quantizes the layer in place before asking for the next one; that layer's outputs (from its
    quantized weights) are then the next layer's hidden states, with the next layer's own arguments.
    """
    layers = model.get_submodule(arch.layers)
    hidden, calls = capture_layer_calls(model, layers, calib_batches)
    for i, layer in enumerate(layers):
        inputs = with_hidden(hidden, calls[i])
        yield i, f"{arch.layers}.{i}.", layer, inputs
        with torch.no_grad():
            hidden = [layer_output(layer(*args, **kwargs)) for args, kwargs in inputs]


def layer_output(out: Any) -> torch.Tensor:
    """Hidden states from a decoder layer's return value (tensor, or tuple in older transformers)."""
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> None:
    """Forward every captured input through ``layer`` (hooks collect what they need)."""
    for args, kwargs in inputs:
        layer(*args, **kwargs)


def collect_linear_inputs(layer: nn.Module, inputs: LayerInputs) -> dict[str, list[torch.Tensor]]:
    """Input rows ``(tokens, in)`` (float32) of every Linear of ``layer``, one tensor per calibration batch."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in linears}

    def record(name: str, x: torch.Tensor) -> None:
        feats[name].append(x.detach().reshape(-1, x.shape[-1]).float())

    handles = [m.register_forward_hook(lambda _m, inp, _o, n=n: record(n, inp[0])) for n, m in linears.items()]
    try:
        run_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: v for n, v in feats.items() if v}


def layer_linear_groups(
    layer: nn.Module, arch: DecoderArch, keep: LinearFilter, prefix: str
) -> list[list[tuple[str, nn.Linear]]]:
    """Linears of one decoder layer in calibration order: the map's sequential groups first, any others after.

    Returns lists of (full name, module); names are ``prefix + local name``.
    """
    named = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    groups: list[list[tuple[str, nn.Linear]]] = []
    seen: set[str] = set()
    for grp in arch.sequential_groups:
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
