"""Mixed 4/8-bit weights under a size budget: the fused graph's MatMulNBits units, their exact bytes, their
sensitivity and the greedy choice of the units that go to 8 bits.

    units = fused_units(qws)                                   # qkv packed, o, gate, up, down, lm_head
    table = unit_sensitivity(model, units, eight, batches, reference)
    choice = choose_units(table, sizes, max_bytes)

A unit is one MatMulNBits of onnxruntime-genai's graph (``compress.genai.build``): q/k/v are packed into one
node, so they share one bit width (gate and up are separate nodes there). Its bytes are the node's
initializers, as the builder writes them and the external data file holds them, back to back (measured on
the tiny Llama): codes ``N * n_blocks * block * bits / 8``, fp32 scales ``N * n_blocks * 4`` (the CPU graph's
float I/O), zero points ``N * ceil(n_blocks * bits / 8)``. The rest of the file is the float norms and the
rotary cos/sin caches (``fixed_bytes``); the stage checks the prediction against the written file.

Sensitivity of a unit = the KL divergence (float model's next-token distribution vs the quantized model's,
mean over tokens) won back when only that unit goes from its 4-bit weights to 8 bits, on calibration windows
held apart from the quantizer's; ``gain / MB`` ranks. Own code: no maintained library measures per-node
gains of a fused ORT GenAI graph; the torch model holding the same dequantized weights stands in for the
graph (their logits agree to the parity the int4 stage reports).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from compress.quant.primitives.weight import QuantizedWeight

_PACKED = ("q_proj", "k_proj", "v_proj")
_LAYER = re.compile(r"^(?P<prefix>.*\blayers)\.(?P<i>\d+)\.(?P<block>self_attn|mlp)\.(?P<proj>\w+)$")


@dataclass(frozen=True)
class Unit:
    """One MatMulNBits of the fused graph: its node name, the torch Linears it packs, its [N, K]."""

    node: str
    modules: tuple[str, ...]
    out_features: int
    in_features: int


def _node_name(module: str) -> str:
    if module.endswith("lm_head"):
        return "/lm_head/MatMulNBits"
    m = _LAYER.match(module)
    if m is None:
        raise ValueError(f"{module}: not a decoder-layer Linear (model.layers.N.self_attn|mlp.X) nor lm_head")
    block = "attn" if m["block"] == "self_attn" else "mlp"
    proj = "qkv_proj" if m["proj"] in _PACKED else m["proj"]
    return f"/model/layers.{m['i']}/{block}/{proj}/MatMulNBits"


def fused_units(shapes: Mapping[str, tuple[int, int]]) -> list[Unit]:
    """The graph's MatMulNBits units of the Linears ``{name: (out, in)}`` (q/k/v of a layer in one unit)."""
    grouped: dict[str, list[str]] = {}
    for name in shapes:
        grouped.setdefault(_node_name(name), []).append(name)
    units = []
    for node, modules in grouped.items():
        ks = {shapes[m][1] for m in modules}
        if len(ks) != 1:
            raise ValueError(f"{node}: packed Linears {modules} have different in_features {sorted(ks)}")
        units.append(Unit(node, tuple(modules), sum(shapes[m][0] for m in modules), ks.pop()))
    return units


def matmul_nbits_bytes(out_features: int, in_features: int, bits: int, block: int, scale_bytes: int = 4) -> int:
    """Bytes of one MatMulNBits' initializers (codes, scales, zero points) as the builder writes them."""
    blocks = math.ceil(in_features / block)
    return out_features * (blocks * block * bits // 8 + blocks * scale_bytes + math.ceil(blocks * bits / 8))


def unit_bytes(unit: Unit, bits: int, block: int) -> int:
    return matmul_nbits_bytes(unit.out_features, unit.in_features, bits, block)


def fixed_bytes(config: Any) -> int:
    """The float tensors of the builder's Llama-style CPU graph besides the MatMulNBits: every RMSNorm weight
    (two per layer and the final one) and the rotary cos/sin caches (``max_position_embeddings`` x half the
    head size each), fp32. A tied embedding reads the lm_head's tensors (no table of its own)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    return 4 * (hidden * (2 * layers + 1) + 2 * config.max_position_embeddings * (head // 2))


def kl_divergence(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over tokens of KL(softmax(reference) || softmax(logits)), in nats."""
    return _LogProbs(reference).kl(logits)


class _LogProbs:
    """The reference's log-probabilities (float64) and probabilities, computed once for every probe."""

    def __init__(self, reference: torch.Tensor) -> None:
        self.log_p = torch.log_softmax(reference.double(), -1)
        self.p = self.log_p.exp()

    def kl(self, logits: torch.Tensor) -> float:
        q = torch.log_softmax(logits.double(), -1)
        return float((self.p * (self.log_p - q)).sum(-1).mean())


@torch.no_grad()
def model_logits(model: torch.nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> list[torch.Tensor]:
    return [model(**b).logits.float() for b in batches]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The decoder's layer list (``model.model.layers`` of a Hugging Face causal LM), None when there is none."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def unit_layer(unit: Unit) -> int | None:
    """The decoder layer every Linear of ``unit`` is in, None when one is outside the layers (the lm_head,
    whose tied table the embedding reads too: its probe must run the whole model)."""
    found = {m["i"] for m in (_LAYER.match(name) for name in unit.modules) if m is not None}
    return int(found.pop()) if len(found) == 1 and all(_LAYER.match(n) for n in unit.modules) else None


class _Replay(torch.nn.Module):
    """Stands in for a decoder layer before the restart point: returns the recorded hidden states entering it."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        assert self.hidden is not None and self.hidden.shape == hidden_states.shape
        return self.hidden


class LayerRestart:
    """Probes that restart at a decoder layer: the hidden states entering each layer are recorded (on
    ``batches``, under the model's current weights); ``logits(L)`` swaps layers ``0..L-1`` for a replay of
    what entered layer L and runs the model, so a probe of a unit in layer L computes only layers L.. and
    the head. Exact as long as nothing before layer L changed since the recording (the probe's unit is in
    layer L). ``logits(L, refresh=True)`` records again what enters layers L.. on the way, so a change in
    layer L that stays (a candidate of the accuracy budget) is in the recording for the next restart.
    Own code: transformers has no entry point that starts a decoder at a given layer; the model's own
    forward still builds the mask, the rotary embedding and the head, only the early layers are replaced.
    """

    def __init__(self, model: torch.nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> None:
        layers = decoder_layers(model)
        if layers is None:
            raise ValueError(f"{type(model).__name__}: no model.model.layers ModuleList to restart in")
        self.model, self.layers, self.batches = model, layers, batches
        self.entering: list[list[torch.Tensor | None]] = [[None] * len(layers) for _ in batches]  # [batch][layer]
        self.base: list[torch.Tensor] = self.logits(0, refresh=True)

    @torch.no_grad()
    def logits(self, start: int, refresh: bool = False) -> list[torch.Tensor]:
        """The logits on every batch, layers before ``start`` replayed (0: the whole model); ``refresh``: the
        hidden states entering layers ``start..`` are recorded again."""
        if start == 0 and not refresh:
            return model_logits(self.model, self.batches)
        saved = [self.layers[i] for i in range(start)]
        replay, current, calls = _Replay(), [0], [0]

        def record(index: int, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.entering[current[0]][index] = hidden.detach().clone()
            calls[0] += 1

        hooks = (
            [
                self.layers[i].register_forward_pre_hook(functools.partial(record, i), with_kwargs=True)
                for i in range(start, len(self.layers))
            ]
            if refresh
            else []
        )
        try:
            for i in range(start):
                self.layers[i] = replay
            out = []
            for i, batch in enumerate(self.batches):
                current[0] = i
                replay.hidden = self.entering[i][start] if start else None
                out.append(self.model(**batch).logits.float())
        finally:
            for h in hooks:
                h.remove()
            for i, layer in enumerate(saved):
                self.layers[i] = layer
        if refresh and calls[0] != len(self.batches) * (len(self.layers) - start):
            raise ValueError(
                f"{type(self.model).__name__}: its forward did not call each of its {len(self.layers)} layers once"
            )
        return out


@torch.no_grad()
def unit_sensitivity(
    model: torch.nn.Module,
    units: Sequence[Unit],
    eight: Mapping[str, torch.Tensor],
    batches: Sequence[Mapping[str, torch.Tensor]],
    reference: list[torch.Tensor],
    progress: Callable[[str], None] | None = None,
    restart: bool = True,
) -> dict[str, Any]:
    """KL of the all-4-bit model and, per unit, the KL with only that unit at 8 bits (``eight``: module ->
    its dequantized 8-bit weight); the model's 4-bit weights are put back after each probe. ``restart``: a
    probe of a unit in decoder layer L starts at layer L from the hidden states recorded under the
    all-4-bit weights (`LayerRestart`, same result; False: every probe runs the whole model)."""
    modules = dict(model.named_modules())
    targets = [_LogProbs(r) for r in reference]
    runner = LayerRestart(model, batches) if restart and decoder_layers(model) is not None else None

    def kl(logits: list[torch.Tensor]) -> float:
        return sum(t.kl(o) for t, o in zip(targets, logits, strict=True)) / len(batches)

    def probe_logits(unit: Unit) -> list[torch.Tensor]:
        return runner.logits(unit_layer(unit) or 0) if runner else model_logits(model, batches)

    base = kl(runner.base if runner else model_logits(model, batches))
    rows = []
    for unit in units:
        saved = {m: modules[m].weight.detach().clone() for m in unit.modules}
        for m in unit.modules:
            modules[m].weight.copy_(eight[m].to(modules[m].weight.dtype))
        probe = kl(probe_logits(unit))
        for m, w in saved.items():
            modules[m].weight.copy_(w)
        rows.append({"node": unit.node, "kl_8bit": probe, "gain": base - probe})
        if progress:
            progress(unit.node)
    return {"kl_4bit": base, "units": rows, "restarted": runner is not None}


@dataclass(frozen=True)
class Choice:
    eight: tuple[str, ...]  # unit nodes at 8 bits, in the order chosen
    predicted_bytes: int
    rows: list[dict[str, Any]]  # every unit: node, gain, cost_bytes, gain_per_mb, chosen; sorted by gain per MB


def choose_units(table: Mapping[str, Any], costs: Mapping[str, int], base_bytes: int, max_bytes: int) -> Choice:
    """Greedy by KL gain per MB: a unit goes to 8 bits when its extra bytes still fit under ``max_bytes``
    (``base_bytes`` = the all-4-bit file); units that do not fit are passed over for smaller ones."""
    rows = [
        {**row, "cost_bytes": costs[row["node"]], "gain_per_mb": row["gain"] / (costs[row["node"]] / 1e6)}
        for row in table["units"]
    ]
    rows.sort(key=lambda r: (-r["gain_per_mb"], r["node"]))
    total, chosen = base_bytes, []
    for row in rows:
        row["chosen"] = row["gain"] > 0 and total + row["cost_bytes"] <= max_bytes
        if row["chosen"]:
            total += row["cost_bytes"]
            chosen.append(row["node"])
    return Choice(tuple(chosen), total, rows)


def eight_bit_weights(
    floats: Mapping[str, torch.Tensor], names: Iterable[str], group_size: int, symmetric: bool
) -> dict[str, QuantizedWeight]:
    """RTN at 8 bits of the float weights the 4-bit quantizer saw (AWQ-scaled where AWQ ran)."""
    from compress.quant.algorithms.rtn import rtn_quantize
    from compress.quant.primitives.weight import WeightQuantConfig

    cfg = WeightQuantConfig(bits=8, group_size=group_size, symmetric=symmetric)
    return {n: rtn_quantize(floats[n].float(), cfg) for n in names}
