"""INT8 of an ONNX graph's MatMul weights (the decoder candidates), with ONNX Runtime's own tools.

    from compress.quant.algorithms.int8_matmul import quantize_int8
    quantize_int8(Path("fp32/model.onnx"), Path("int8/model.onnx"))        # DEFAULT_INT8_METHOD

Candidates (no hand-written kernels):

- ``dynamic``: ``quantize_dynamic`` (W8A8: weights int8 per output channel, activations uint8 quantized
  per tensor at run time) on every MatMul with a constant weight -> ``DynamicQuantizeLinear`` +
  ``MatMulInteger``. ORT docs recommend dynamic quantization for transformers on CPU. With
  ``activations="token"`` the ``DynamicQuantizeLinear`` nodes become per-token scales (``int8_per_token``).
- ``weight-only``: ``MatMulNBitsQuantizer(bits=8)`` -> ``com.microsoft.MatMulNBits`` with int8 groups
  (``group_size`` along K, `compress.quant.scheme`'s rule) dequantised inside the kernel;
  ``accuracy_level=4`` lets the kernel quantize activations to int8 and use integer dot products.

The lm_head (the last MatMul, onto the vocabulary; a transposed copy of the embedding when tied) is
quantized by default (``lm_head="int8"``): on SmolLM2 it is 49152 x 576, ~20% of all MatMul weights. A tied
embedding then reads the head's 8-bit codes through ``GatherBlockQuantized`` (``int8_tied``), so the file
holds the table once, at 8 bits (SmolLM2-135M: 113 MB of FP32 table gone); an untied embedding keeps its
own FP32 table (ORT's 8-bit Gather quantization would need opset 21, and the re-versioned graph failed to
load in ONNX Runtime: "Unrecognized attribute: axes for operator ReduceMean").

``DEFAULT_INT8_METHOD = "weight-only"`` (``accuracy_level=4``, groups of 32, lm_head included) was chosen
from this table, measured on an AVX-512 VNNI/AMX machine (1 thread, batch 1) with a comparison script no
longer in the repository; it is not this project's AVX2 CPU, where ONNX Runtime's u8·s8 kernels saturate
(see `compress.stages.quantize.int8`), so rerun the README's SmolLM2 INT8 pipeline for figures here:

==================  =================  ==================  ===========================================
SmolLM2-135M        decode ms (127+1)  prefill-128 ms      pydoc ppl, 4 x 128 tokens (top-1 agree)
==================  =================  ==================  ===========================================
FP32                60.2               567                 27.22
dynamic W8A8        26.4               205                 43.12 (64 %)
weight_only acc 4   22.3               290                 27.40 (94 %)
weight_only acc 0   520                1129                27.17 (98 %)
==================  =================  ==================  ===========================================

Dynamic W8A8 is fastest at prefill but quantizes each activation tensor with one scale, and LLM
activations have outlier channels (Dettmers et al. 2022, LLM.int8(), arXiv:2208.07339; Xiao et al. 2022,
SmoothQuant, arXiv:2211.10438): perplexity rose 58 % there. Weight-only INT8 with ``accuracy_level=4``
(int8 activations per group of 32, so outliers stay local) kept perplexity within 1 % and decoded fastest;
without an accuracy level MatMulNBits-8 fell back to a slow path (9x slower than FP32 there).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from compress.families.causal_lm.export import lm_head_matmul
from compress.onnx_files import copy_model, wants_external_data, write_atomically
from compress.progress import quiet_third_party
from compress.quant.algorithms.int8_per_token import rewrite_file
from compress.quant.algorithms.int8_tied import share_quantized_table
from compress.quant.scheme import group_size_problem
from compress.quant.vocab import ACTIVATIONS, Int8Method

DEFAULT_INT8_METHOD: Int8Method = "weight-only"


#: how each `activations` choice is described in an artifact's info
ACTIVATION_INFO: dict[str, str] = {
    "tensor": "uint8 dynamic, one scale per tensor (DynamicQuantizeLinear)",
    "token": "uint8 dynamic, one scale per token (symmetric, zero point 128)",
}


def lm_head_nodes(onnx_path: Path) -> list[str]:
    """Names of the MatMul/Gemm nodes that produce ``logits`` (the lm_head, before any soft-capping)."""
    import onnx

    head = lm_head_matmul(onnx.load(str(onnx_path), load_external_data=False).graph)
    return [head.name] if head is not None else []


def quantize_dynamic_int8(
    src: Path,
    dst: Path,
    *,
    per_channel: bool = True,
    lm_head: bool = True,
    reduce_range: bool = False,
    activations: str = "tensor",
) -> Path:
    """W8A8 dynamic quantization of every constant-weight MatMul (``onnxruntime.quantization``).

    ``activations``: ``tensor`` (one uint8 scale per MatMul input, ``DynamicQuantizeLinear``) or ``token``
    (one scale per token, ``int8_per_token``).

    ``reduce_range``: 7-bit weights, so ONNX Runtime's u8·s8 kernels cannot saturate on a CPU without VNNI
    (``compress.bench.harness.int8_dot_saturates``).

    ONNX Runtime writes a scratch copy beside its input, so it reads a copy of ``src`` in our own
    folder (``copy_model``), never writing into the folder of ``src``.
    """
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations = {activations!r}; allowed: {', '.join(ACTIVATIONS)}")
    exclude = [] if lm_head else lm_head_nodes(src)

    def write(tmp: Path) -> None:
        with quiet_third_party():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(
                str(copy_model(Path(src), tmp.parent / "input")),
                str(tmp),
                op_types_to_quantize=["MatMul"],
                per_channel=per_channel,
                weight_type=QuantType.QInt8,
                reduce_range=reduce_range,
                nodes_to_exclude=exclude,
                use_external_data_format=wants_external_data(Path(src)),
                extra_options={"MatMulConstBOnly": True},
            )
        if activations == "token":
            rewrite_file(tmp)

    return write_atomically(Path(dst), write)


def quantize_weight_only_int8(
    src: Path,
    dst: Path,
    *,
    group_size: int = 32,
    accuracy_level: int | None = 4,
    symmetric: bool = True,
    lm_head: bool = True,
    share_table: bool = True,
) -> Path:
    """Weight-only INT8 (``MatMulNBits`` bits=8, groups of ``group_size`` along K); ``lm_head=False`` keeps
    the output projection float. With an 8-bit lm_head and ``share_table`` a tied embedding reads the head's
    8-bit codes (``int8_tied``) instead of keeping its FP32 table; ``share_table=False`` keeps the old layout
    (the table in FP32, beside the 8-bit head), for comparison."""
    model = weight_only_int8_model(
        src,
        group_size=group_size,
        accuracy_level=accuracy_level,
        symmetric=symmetric,
        lm_head=lm_head,
        share_table=share_table,
    )
    return save_quantized(model, Path(dst), external=wants_external_data(Path(src)))


def save_quantized(model, dst: Path, *, external: bool) -> Path:  # model: onnx.ModelProto
    """Write a quantizer's graph as ONNX Runtime's quantizers do (topologically sorted, initializers checked)."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    def write(tmp: Path) -> None:
        ONNXModel(model).save_model_to_file(str(tmp), use_external_data_format=external)

    return write_atomically(dst, write)


def weight_only_int8_model(
    src: Path,
    *,
    group_size: int = 32,
    accuracy_level: int | None = 4,
    symmetric: bool = True,
    lm_head: bool = True,
    share_table: bool = True,
):  # -> onnx.ModelProto (onnx is imported lazily)
    """The graph `quantize_weight_only_int8` writes, in memory (tensors inside, topologically sorted)."""
    import onnx

    with quiet_third_party():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    problem = group_size_problem(group_size)
    if problem:
        raise ValueError(problem)
    if accuracy_level not in (None, 0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level = {accuracy_level}; allowed: None, 0, 1, 2, 3, 4")
    exclude = [] if lm_head else lm_head_nodes(src)
    model = onnx.load(str(src))
    head = lm_head_matmul(model.graph)
    head_names = (head.input[1], head.output[0]) if head is not None and head.op_type == "MatMul" else None
    with quiet_third_party():
        quant = MatMulNBitsQuantizer(
            model,
            bits=8,
            block_size=group_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            nodes_to_exclude=exclude,
        )
        quant.process()
    if lm_head and share_table and head_names:
        share_quantized_table(quant.model.model, *head_names)
    quant.model.topological_sort()
    return quant.model.model


#: the MatMul-only methods (static Q/DQ is the stage's `_static`)
INT8_METHODS: dict[str, Callable[..., Path]] = {
    "dynamic": quantize_dynamic_int8,
    "weight-only": quantize_weight_only_int8,
}


def quantize_int8(src: Path, dst: Path, *, method: str = DEFAULT_INT8_METHOD, lm_head: bool = True) -> Path:
    """Quantize the decoder at ``src`` to INT8 with ``method`` (default: the measured winner)."""
    if method not in INT8_METHODS:
        raise ValueError(f"int8 method {method!r} unknown; allowed: {', '.join(INT8_METHODS)}")
    return INT8_METHODS[method](Path(src), Path(dst), lm_head=lm_head)
