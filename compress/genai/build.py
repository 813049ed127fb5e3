"""Build ONNX Runtime GenAI's fused decoder graph, optionally from our own INT4 or INT8 weights.

    build_fused_decoder("runs/x/hf", "runs/x/genai-int4", precision="int4", quantized=qws)

What onnxruntime-genai 0.18's model builder (``onnxruntime_genai/models/builder.py``,
``builders/base.py``, ``loaders/base.py`` + ``loaders/gptq.py``) does, read from its source:

- Graph: GroupQueryAttention (rotary inside, shared past/present buffer), SkipSimplifiedLayerNormalization,
  packed QKV (one MatMul/MatMulNBits of ``q + 2 kv`` outputs), MatMulNBits for quantized weights, and
  GatherBlockQuantized for a tied embedding stored once in the lm_head's 4-bit tensors. Opset 22 +
  com.microsoft. Inputs ``input_ids, attention_mask, past_key_values.%d.{key,value}``; output ``logits``
  for every position (full-sequence logits, so perplexity can be measured on the shipped file).
- Architectures: the ``config.architectures[0]`` values its ``create_model`` dispatches on
  (``GENAI_ARCHITECTURES`` below); anything else raises NotImplementedError. Quantized checkpoints are
  read with Llama-style tensor names (``model.layers.N.self_attn.q_proj``, ``mlp.gate_proj`` ...).
- Quantized inputs: ``config.json``'s ``quantization_config.quant_method`` selects the loader (gptq,
  awq, quark, olive, modelopt, quant_auto). The GPTQ loader reads AutoGPTQ v1 tensors only: it always
  adds 1 to ``qzeros`` modulo 16 (``checkpoint_format`` is never read, so a ``gptq_v2`` folder would be
  misread), accepts 2/4/8 bits and per-layer ``dynamic`` overrides, and uses ``group_size`` as the
  MatMulNBits ``block_size`` (-1 becomes ``in_features``; the contrib-op spec wants a power of two
  >= 16, so per-row groups are refused here). It dequantizes to fp16 and re-quantizes with the same
  scales and zero points (the codes come back unchanged, tests/genai), always writes zero points
  (symmetric weights get an explicit 8, or 128 at 8 bits: removed afterwards, ``rewrite``), and keeps
  ``g_idx`` as a MatMulNBits input only when ``desc_act`` is true; ONNX Runtime's CPU MatMulNBits then
  gives logits far from the weights' (measured on the tiny Llama), so act-order weights without static
  groups are refused here. ``sym`` is not read.
- lm_head and tied embeddings: a quantized ``lm_head.qweight`` becomes a MatMulNBits; without one the
  float lm_head (and every other float MatMul) is quantized by the builder's own RTN pass (``to_nbits``:
  ``block_size`` default 32, ``is_symmetric`` default true, ``accuracy_level`` default 4 on CPU, 0
  elsewhere). ``shared_embeddings`` defaults to ``tie_word_embeddings``; when both the embedding Gather and
  the lm_head are quantized the embedding reads the lm_head's 4-bit tensors through GatherBlockQuantized
  (its messages say INT4 only, yet ``matmul_mixed_precision=last_matmul:int8`` emits an 8-bit gather whose
  inputs do not exist: fixed in ``rewrite``, and ONNX Runtime runs it, tests/genai). By its
  ``make_tied_embeddings_init``, excluding only one of the two (``nodes_to_exclude``) unties them, so
  ``lm_head="float"`` here excludes both and the float table is shared by a Transpose + Gather.
  ``exclude_lm_head`` / ``exclude_embeds`` drop the head / embedding from the graph (not used here).
- Execution providers: cpu, cuda, dml, webgpu, NvTensorRtRtx. The graph for cuda is built on any machine
  (fp16 I/O for int4/fp16); nothing here runs it.

Our weights enter through a temporary AutoGPTQ-layout folder written with ``pack_gptq`` (4 bits) or
``pack_gptq8`` (8 bits) (v1 zero points, stored modulo 2**bits, so a zero point of 0 survives the
builder's ``+1``). ``precision="int8"``: the builder runs its int4 path (the only one that reads a GPTQ
checkpoint and ties a quantized embedding); its loader takes ``bits`` from the checkpoint, so every
MatMulNBits and the tied GatherBlockQuantized are 8-bit and hold our codes (tests/genai/test_genai_int8.py;
the builder's "INT4 only" gather messages concern its own RTN of a float embedding). The scales are rounded to fp16
(the format's type), the only difference between the graph's weights and ours. Graph fixes follow
(``rewrite``): for the tied embedding's GatherBlockQuantized, 2-D scales / zero points and real input
names for an 8-bit lm_head; for our weights (``quantized=``), every zero-point tensor equal to the kernels'
default ``2**(bits-1)`` (symmetric weights) is removed, so a symmetric 8-bit file holds codes, scales, norms
and the rotary caches only (the layer-streamed graph, ``layered``, keeps the builder's tensors as they are).
Each weight may have its own group size (the loader's per-module ``dynamic`` overrides), the packed q/k/v
sharing one.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from compress.errors import MissingDependencyError
from compress.genai.rewrite import drop_default_zero_points, fix_tied_embedding
from compress.quant.primitives.packing import pack_gptq, shift_zero_points
from compress.quant.primitives.weight import QuantizedWeight

Precision = Literal["fp32", "int4", "int8"]
ExecutionProvider = Literal["cpu", "cuda"]
LmHead = Literal["int4", "int8", "float"]

#: ``config.architectures[0]`` values that onnxruntime-genai 0.18.0's ``create_model`` dispatches on.
GENAI_ARCHITECTURES = frozenset(
    {
        "ChatGLMForConditionalGeneration",
        "ChatGLMModel",
        "Ernie4_5ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "GptOssForCausalLM",
        "GraniteForCausalLM",
        "HunYuanDenseV1ForCausalLM",
        "InternLM2ForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "NemotronForCausalLM",
        "OlmoForCausalLM",
        "PhiForCausalLM",
        "Phi3ForCausalLM",
        "Phi3SmallForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "SmolLM3ForCausalLM",
    }
)
#: Architectures whose checkpoints use the Llama tensor names the builder's GPTQ loader matches
#: (``model.layers.N.self_attn.q_proj`` ...); tested on Llama (tests/genai), the others share its names.
GPTQ_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})
_HF_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _builder():
    try:
        from onnxruntime_genai.models import builder
    except ImportError as e:
        raise MissingDependencyError("onnxruntime-genai", "llm", "the fused decoder graph") from e
    return builder


def _architecture(hf_folder: Path) -> tuple[dict, str]:
    config_path = hf_folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: missing; build_fused_decoder needs a Hugging Face model folder")
    config = json.loads(config_path.read_text())
    arch = (config.get("architectures") or ["<none>"])[0]
    if arch not in GENAI_ARCHITECTURES:
        raise ValueError(
            f"{config_path}: architectures[0] = {arch!r}; onnxruntime-genai's builder supports "
            f"{', '.join(sorted(GENAI_ARCHITECTURES))}; export this model with compress's own exporter instead"
        )
    return config, arch


def _check_quantized(quantized: Mapping[str, QuantizedWeight], arch: str, mixed: bool = False) -> QuantizedWeight:
    """The (bits, group_size, symmetric) setting of the checkpoint's ``quantization_config``, or a ValueError.

    Every weight shares ``symmetric`` and, without ``mixed``, the bits; each may carry its own group size (and
    with ``mixed`` 4 or 8 bits), written as per-module ``dynamic`` overrides (``_dynamic_overrides``) of the
    setting returned: the first 4-bit weight's with ``mixed``, else the first weight's."""
    if arch not in GPTQ_ARCHITECTURES:
        raise ValueError(
            f"quantized weights for {arch}: the builder's GPTQ loader is used here only for "
            f"{', '.join(sorted(GPTQ_ARCHITECTURES))}; build precision='int4' without quantized= instead"
        )
    four = [qw for qw in quantized.values() if qw.bits == 4]
    first = four[0] if mixed and four else next(iter(quantized.values()))
    for name, qw in quantized.items():
        if qw.bits not in (4, 8) or (qw.bits != first.bits and not mixed):
            raise ValueError(
                f"quantized[{name!r}].bits = {qw.bits}, first weight's {first.bits}; allowed: 4 or 8, the same for "
                "every weight (one quantization_config.bits per checkpoint; mixed=True takes 4 and 8 per module)"
            )
        if qw.group_size == -1 or qw.group_size & (qw.group_size - 1) or qw.group_size < 16:
            raise ValueError(
                f"quantized[{name!r}].group_size = {qw.group_size}; the builder uses it as MatMulNBits block_size: "
                "allowed a power of two >= 16"
            )
        if not qw.has_trivial_g_idx():
            raise ValueError(
                f"quantized[{name!r}] has an act-order g_idx; the builder hands it to MatMulNBits, whose CPU "
                "result then disagrees with the weights (tests/genai); quantize with static_groups=True"
            )
        if qw.symmetric != first.symmetric:
            raise ValueError(
                f"quantized[{name!r}]: symmetric = {qw.symmetric} differs from {first.symmetric}; the builder "
                "reads one quantization_config.sym per model"
            )
    _check_packed_units(quantized)
    return first


#: Linears the builder packs into one MatMulNBits (``make_packed_matmul_int4_class``: same bits and group size).
PACKED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),)


def _check_packed_units(quantized: Mapping[str, QuantizedWeight]) -> None:
    for name, qw in quantized.items():
        for group in PACKED:
            if not name.endswith("." + group[0]):
                continue
            prefix = name[: -len(group[0])]
            for other in group[1:]:
                o = quantized.get(prefix + other)
                if o is not None and (o.bits, o.group_size) != (qw.bits, qw.group_size):
                    raise ValueError(
                        f"quantized[{prefix + other!r}] is {o.bits}-bit g{o.group_size}, {name!r} {qw.bits}-bit "
                        f"g{qw.group_size}: the builder packs {', '.join(group)} into one MatMulNBits; give them "
                        "the same bits and group size"
                    )


def _dynamic_overrides(quantized: Mapping[str, QuantizedWeight], first: QuantizedWeight) -> dict[str, dict]:
    """GPTQModel-style ``dynamic`` overrides for the weights that differ from ``first``'s bits / group size.

    The builder's GPTQ loader (``loaders/gptq.py``, ``get_overrides``) ``re.match``es each pattern, ``+:``
    prefix removed, against the tensor names (``model.layers.0.mlp.down_proj.qweight``, ``lm_head.qweight``).
    """
    return {
        "+:^" + re.escape(name) + r"\.": {"bits": qw.bits, "group_size": qw.group_size}
        for name, qw in quantized.items()
        if (qw.bits, qw.group_size) != (first.bits, first.group_size)
    }


def _float_tensors(hf_folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(hf_folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_folder}: no *.safetensors file (save the model with save_pretrained)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def pack_gptq8(qw: QuantizedWeight) -> dict[str, np.ndarray]:
    """AutoGPTQ tensors of 8-bit ``qw`` (zeros as given): four codes an int32, lowest byte first.

    ``pack_gptq`` (``compress.quant.primitives``) writes 4 bits only; this is the same layout at 8 bits, the
    one the builder's ``unpack_on_row_for_2_4_8_bits`` reads (shifts 0, 8, 16, 24 along K / along N).
    """
    n, k = qw.shape
    if k % 4 or n % 4:
        raise ValueError(f"8-bit GPTQ packing needs in and out features divisible by 4, got [{n}, {k}]")

    def pack_rows(codes: np.ndarray) -> np.ndarray:  # (R, C) uint8 -> (R/4, C) int32, row 4i+j at byte j
        c = codes.astype(np.uint32).reshape(-1, 4, codes.shape[1])
        packed = c[:, 0] | (c[:, 1] << 8) | (c[:, 2] << 16) | (c[:, 3] << 24)
        return np.ascontiguousarray(packed.view(np.int32))

    return {
        "qweight": pack_rows(qw.qweight.numpy().T),  # (K/4, N)
        "qzeros": np.ascontiguousarray(pack_rows(qw.zeros.numpy()).T),  # (n_groups, N/4)
        "scales": np.ascontiguousarray(qw.scales.float().numpy().T.astype(np.float16)),  # (n_groups, N)
        "g_idx": qw.group_index().numpy().astype(np.int32),
    }


def write_builder_checkpoint(
    hf_folder: Path, quantized: Mapping[str, QuantizedWeight], folder: Path, *, mixed: bool = False
) -> Path:
    """Write ``folder`` as the AutoGPTQ-layout checkpoint the builder's GPTQ loader reads.

    ``mixed``: 4- and 8-bit weights side by side. Weights whose bits / group size differ from the
    ``quantization_config``'s are named in ``dynamic`` overrides.

    Zero points are stored as ``(zero - 1) mod 16``: the loader adds 1 modulo 16, so every zero point
    0..15 reads back exactly (AutoGPTQ v1 cannot store 0; the builder's wrap-around can).
    """
    from safetensors.torch import save_file

    config, arch = _architecture(hf_folder)
    first = _check_quantized(quantized, arch, mixed)
    tensors = _float_tensors(hf_folder)
    missing = [name for name in quantized if f"{name}.weight" not in tensors and name != "lm_head"]
    if missing:
        raise ValueError(f"quantized weights {missing} name no Linear weight in {hf_folder}")
    out: dict[str, torch.Tensor] = {k: v for k, v in tensors.items() if k[: -len(".weight")] not in quantized}
    for name, qw in quantized.items():
        stored = shift_zero_points(qw, -1)  # the loader adds 1 modulo 2**bits
        if qw.bits == 4:
            t = pack_gptq(stored, "gptq_v2")  # v2 packing stores the zeros as given: the shifted v1 values
            tensors = {"qweight": t.qweight, "qzeros": t.qzeros, "scales": t.scales, "g_idx": t.g_idx}
        else:
            tensors = pack_gptq8(stored)
        for key, value in tensors.items():
            out[f"{name}.{key}"] = torch.from_numpy(value)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": first.bits,
        "group_size": first.group_size,
        "desc_act": False,  # act-order g_idx is refused above
        "sym": first.symmetric,
        "checkpoint_format": "gptq",
    }
    if dynamic := _dynamic_overrides(quantized, first):
        config["quantization_config"]["dynamic"] = dynamic
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in _HF_SIDE_FILES:
        if (hf_folder / name).exists():
            shutil.copy2(hf_folder / name, folder / name)
    return folder


def _extra_options(
    precision: Precision,
    *,
    accuracy_level: int | None,
    block_size: int,
    symmetric: bool,
    lm_head: LmHead,
) -> list[str]:
    if precision == "fp32":
        return []
    options = [f"block_size={block_size}", f"is_symmetric={str(symmetric).lower()}"]
    if accuracy_level is not None:
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level = {accuracy_level}; allowed: 0, 1, 2, 3, 4 (MatMulNBits)")
        options.append(f"accuracy_level={accuracy_level}")
    if lm_head == "float":  # both, or a tied table would be stored twice (float Gather + 4-bit head)
        options.append("nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather")
    elif lm_head == "int8":
        options.append("matmul_mixed_precision=last_matmul:int8")
    return options


def _run_builder(source: Path, out: Path, precision: str, ep: str, extra: list[str], verbose: bool) -> None:
    builder = _builder()
    log = io.StringIO()
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(log)
    quiet_err = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(log)
    cache = out.parent / f"{out.name}.cache"
    previous = logging.root.manager.disable
    if not verbose:
        logging.disable(logging.INFO)  # onnxruntime.quantization logs every node it skips at INFO
    try:
        with quiet, quiet_err:
            options = builder.parse_extra_options(None, str(source), str(out), precision, ep, str(cache), extra)
            builder.create_model(None, str(source), str(out), precision, ep, str(cache), **options)
    except Exception as e:  # noqa: BLE001 - any failure of the external tool, re-raised with its log
        tail = "\n".join(log.getvalue().splitlines()[-20:])
        raise RuntimeError(f"onnxruntime-genai builder failed on {source} ({precision}, {ep}): {e}\n{tail}") from e
    finally:
        logging.disable(previous)
        shutil.rmtree(cache, ignore_errors=True)


def build_fused_decoder(
    hf_folder: str | Path,
    out_dir: str | Path,
    *,
    precision: Precision = "fp32",
    quantized: Mapping[str, QuantizedWeight] | None = None,
    execution_provider: ExecutionProvider = "cpu",
    accuracy_level: int | None = None,
    block_size: int = 32,
    symmetric: bool = True,
    lm_head: LmHead = "int4",
    mixed: bool = False,
    prune_lm_head: bool = False,
    verbose: bool = False,
) -> Path:
    """Run the builder on ``hf_folder`` and return ``out_dir`` (``model.onnx``, its data, genai_config.json).

    ``quantized`` (``{module name: QuantizedWeight}``, all 4-bit or all 8-bit as ``precision``, each at its
    own group size if it needs one; int8 needs every Linear, lm_head included) replaces those Linears by
    our codes, zero points equal to the kernels' default dropped (``rewrite``); MatMuls left in float get the
    builder's own RTN (``block_size``, ``symmetric``). ``lm_head`` says how an lm_head that is not in
    ``quantized`` is stored: the builder's RTN at 4 or 8 bits (a tied embedding then reads the same codes),
    or float. ``mixed`` (precision int4): ``quantized`` may hold 8-bit weights beside the 4-bit ones (at their
    own group size); the builder's loader reads their bits from per-module ``dynamic`` overrides, so those
    MatMulNBits (and a tied embedding's GatherBlockQuantized, for an 8-bit lm_head) are 8-bit.
    ``accuracy_level`` None keeps the builder's default (4 on CPU,
    0 on CUDA). ``prune_lm_head``: the builder's own option of that name (a Gather of the last position before
    the head), so a prompt's forward computes the head once, not once per prompt token; the graph's logits are
    then (B, 1, V) (`OrtCausalLM` evaluates such a graph token by token). The folder appears only when complete.
    """
    hf_folder, out_dir = Path(hf_folder), Path(out_dir)
    if precision not in ("fp32", "int4", "int8"):
        raise ValueError(f"precision = {precision!r}; allowed: fp32, int4, int8")
    if execution_provider not in ("cpu", "cuda"):
        raise ValueError(f"execution_provider = {execution_provider!r}; allowed: cpu, cuda")
    if quantized and precision == "fp32":
        raise ValueError("quantized weights given with precision = 'fp32'; they need precision 'int4' or 'int8'")
    bits = {"int4": 4, "int8": 8}.get(precision)
    if mixed and precision != "int4":
        raise ValueError(f"mixed=True with precision = {precision!r}; mixed 4/8-bit weights build with 'int4'")
    allowed = {4, 8} if mixed else {bits}
    wrong = [name for name, qw in (quantized or {}).items() if qw.bits not in allowed]
    if wrong:
        said = "4- or 8-bit (mixed)" if mixed else f"{bits}-bit"
        raise ValueError(f"precision = {precision!r} but quantized{wrong[:3]} are not {said}")
    if precision == "int8" and (not quantized or "lm_head" not in quantized):
        raise ValueError(
            "precision = 'int8' builds from our 8-bit weights only, lm_head included (the builder's own RTN "
            "would quantize every float MatMul at 4 bits): pass quantized= with every Linear and 'lm_head'"
        )
    if lm_head not in ("int4", "int8", "float"):
        raise ValueError(f"lm_head = {lm_head!r}; allowed: int4, int8, float")
    if quantized and "lm_head" in quantized and lm_head != f"int{quantized['lm_head'].bits}":
        raise ValueError(
            f"lm_head = {lm_head!r} but quantized holds our {quantized['lm_head'].bits}-bit 'lm_head'; drop one of them"
        )
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: exists; remove it or choose another output folder")
    _architecture(hf_folder)
    # our 8-bit weights go through the builder's int4 path: its GPTQ loader takes each layer's bits from the
    # checkpoint (MatMulNBits bits=8), and only that path makes the tied GatherBlockQuantized
    builder_precision = "int4" if precision == "int8" else precision
    extra = _extra_options(
        builder_precision,
        accuracy_level=accuracy_level,
        block_size=block_size,
        symmetric=symmetric,
        # no option when the head is ours (an 8-bit one too): the builder's RTN is for a float head only
        lm_head="int4" if precision == "int8" or "lm_head" in (quantized or {}) else lm_head,
    )
    if prune_lm_head:
        extra.append("prune_lm_head=true")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        source = write_builder_checkpoint(hf_folder, quantized, work / "gptq", mixed=mixed) if quantized else hf_folder
        _run_builder(source, work / "model", builder_precision, execution_provider, extra, verbose)
        if builder_precision == "int4":
            fix_tied_embedding(work / "model" / "model.onnx")
        if quantized:  # our symmetric weights: the loader's explicit zero points equal the kernels' default
            drop_default_zero_points(work / "model" / "model.onnx")
        os.replace(work / "model", out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir
