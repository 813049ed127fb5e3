"""Decoder architectures as data: where each part of a Hugging Face decoder layer lives.

Stages, quantization (GPTQ's sequential targets, AWQ's scale groups) and pruning look an architecture up
here by the model config's `model_type` and never name one themselves. Adding an architecture is one
entry in `ARCHITECTURES` plus one tiny random-weight test (tests/families/test_decoder_archs.py).

Module paths are relative to one decoder layer (`layers` is relative to the whole model). A fused
projection (Phi-3's `qkv_proj`, `gate_up_proj`) is one Linear whose output rows are the parts in order:
`[q | k | v]` and `[gate | up]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ScaleGroup:
    """An AWQ scale group: Linears sharing one input, and the op whose output channels produce it.

    `part = (index, count)` when `producer` is a fused Linear: its rows are `count` equal parts and only part
    `index` feeds the consumers (Phi-3's `up` half of `gate_up` for `down`). The fold is exact only when that
    part's rows are the consumers' input columns one for one; AWQ skips (and reports) a group where they are
    not (grouped-query attention: fewer `v` rows than `o` columns).
    """

    producer: str  # a norm (x_hat * (norm_offset + weight)) or a Linear
    consumers: tuple[str, ...]
    part: tuple[int, int] | None = None


@dataclass(frozen=True)
class DecoderArch:
    """One decoder family's layout. Fields are module paths inside a decoder layer unless said otherwise."""

    name: str
    model_types: tuple[str, ...]  # HF `config.model_type` values this entry serves
    layers: str = "model.layers"  # the ModuleList of decoder layers, from the model
    embed: str = "model.embed_tokens"  # from the model
    final_norm: str = "model.norm"  # from the model
    lm_head: str = "lm_head"  # from the model
    q: str | None = "self_attn.q_proj"
    k: str | None = "self_attn.k_proj"
    v: str | None = "self_attn.v_proj"
    qkv: str | None = None  # fused [q | k | v] rows instead of q, k, v
    o: str = "self_attn.o_proj"
    gate: str | None = "mlp.gate_proj"
    up: str | None = "mlp.up_proj"
    gate_up: str | None = None  # fused [gate | up] rows instead of gate, up
    down: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"  # the norm whose output feeds q, k, v
    mlp_norm: str = "post_attention_layernorm"  # the norm whose output feeds gate, up
    extra_norms: tuple[str, ...] = ()  # norms on a sub-layer's *output* (Gemma 2/3): not foldable inputs
    qk_norms: tuple[str, ...] = ()  # per-head RMSNorms over head_dim on q and k (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # RMSNorm computes x_hat * (offset + weight): 1.0 for Gemma, 0.0 elsewhere
    sliding_window_layers: bool = False  # layers alternate local (sliding) and global attention

    def __post_init__(self) -> None:
        if (self.qkv is None) == (self.q is None or self.k is None or self.v is None):
            raise ValueError(f"{self.name}: give either q, k and v or a fused qkv, not both or neither")
        if (self.gate_up is None) == (self.gate is None or self.up is None):
            raise ValueError(f"{self.name}: give either gate and up or a fused gate_up, not both or neither")

    @property
    def fused(self) -> bool:
        return self.qkv is not None or self.gate_up is not None

    @property
    def attention_inputs(self) -> tuple[str, ...]:
        """The Linears that read the attention norm's output."""
        return (self.qkv,) if self.qkv else (self.q, self.k, self.v)  # type: ignore[return-value]

    @property
    def mlp_inputs(self) -> tuple[str, ...]:
        """The Linears that read the MLP norm's output."""
        return (self.gate_up,) if self.gate_up else (self.gate, self.up)  # type: ignore[return-value]

    @property
    def linears(self) -> tuple[str, ...]:
        """Every Linear of a decoder layer, in execution order."""
        return (*self.attention_inputs, self.o, *self.mlp_inputs, self.down)

    @property
    def sequential_groups(self) -> tuple[tuple[str, ...], ...]:
        """GPTQ's sequential targets: Linears that share one input, in the order the layer runs them."""
        return (self.attention_inputs, (self.o,), self.mlp_inputs, (self.down,))

    @property
    def scale_groups(self) -> tuple[ScaleGroup, ...]:
        """AWQ's scale groups in layer order: norm -> attention inputs, v -> o, norm -> MLP inputs, up -> down."""
        v_to_o = ScaleGroup(self.v, (self.o,)) if self.v else ScaleGroup(self.qkv, (self.o,), (2, 3))  # type: ignore[arg-type]
        up_to_down = (
            ScaleGroup(self.up, (self.down,)) if self.up else ScaleGroup(self.gate_up, (self.down,), (1, 2))  # type: ignore[arg-type]
        )
        return (
            ScaleGroup(self.attn_norm, self.attention_inputs),
            v_to_o,
            ScaleGroup(self.mlp_norm, self.mlp_inputs),
            up_to_down,
        )

    @property
    def softmax_inputs(self) -> tuple[str, ...]:
        """Linears whose outputs meet in a softmax (q, k): AWQ does not clip them (a Linear MSE misses that)."""
        return (self.qkv,) if self.qkv else (self.q, self.k)  # type: ignore[return-value]


#: Gemma 2/3: the MLP reads its own pre-norm; post-norms sit on the sub-layers' outputs; RMSNorm is (1 + w)
_GEMMA: dict[str, Any] = {
    "mlp_norm": "pre_feedforward_layernorm",
    "extra_norms": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "norm_offset": 1.0,
    "sliding_window_layers": True,
}

ARCHITECTURES: dict[str, DecoderArch] = {
    arch.name: arch
    for arch in (
        DecoderArch("llama", ("llama",)),
        DecoderArch("mistral", ("mistral",)),
        DecoderArch("qwen2", ("qwen2",)),
        DecoderArch("qwen3", ("qwen3",), qk_norms=("self_attn.q_norm", "self_attn.k_norm")),
        DecoderArch("gemma2", ("gemma2",), **_GEMMA),
        DecoderArch("gemma3", ("gemma3_text",), qk_norms=("self_attn.q_norm", "self_attn.k_norm"), **_GEMMA),
        DecoderArch(
            "phi3",
            ("phi3",),
            q=None,
            k=None,
            v=None,
            qkv="self_attn.qkv_proj",
            gate=None,
            up=None,
            gate_up="mlp.gate_up_proj",
        ),
    )
}

_BY_MODEL_TYPE = {t: arch for arch in ARCHITECTURES.values() for t in arch.model_types}


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_BY_MODEL_TYPE))


def arch_for_model_type(model_type: str) -> DecoderArch:
    """The map of a HF `config.model_type`; ValueError naming the supported ones for any other."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise ValueError(
            f"decoder architecture '{model_type}' has no architecture map; supported: "
            f"{', '.join(supported_model_types())} (add one in compress/families/causal_lm/archs.py)"
        ) from None


def find_arch(model: Any) -> DecoderArch | None:
    """The map of `model` if it is a mapped decoder, else None (a CNN, an encoder: no decoder layers)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None


def arch_of(model: Any) -> DecoderArch:
    """The map of a loaded HF causal LM (by `model.config.model_type`)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise ValueError(f"{type(model).__name__} has no config.model_type: not a Hugging Face decoder")
    return arch_for_model_type(model_type)


def decoder_layers(model: Any, arch: DecoderArch | None = None) -> Any:
    """The ModuleList of decoder layers of `model` (an `nn.ModuleList`), located by its map."""
    arch = arch or arch_of(model)
    return model.get_submodule(arch.layers)
