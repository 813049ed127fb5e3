"""INT8 for the ONNX KV-cache decoder, with the candidate chosen by measured latency on this CPU.

    from compress.llm.quant_int8 import quantize_int8, measure_decoder
    quantize_int8(Path("fp32/model.onnx"), Path("int8/model.onnx"))        # DEFAULT_INT8_METHOD
    measure_decoder(Path("int8/model.onnx"), threads=1)                    # decode / prefill ms

Candidates (both from ONNX Runtime's own quantization tools, no hand-written kernels):

- ``dynamic``: ``quantize_dynamic`` (W8A8: weights int8 per output channel, activations uint8 quantized
  per tensor at run time) on every MatMul with a constant weight -> ``DynamicQuantizeLinear`` +
  ``MatMulInteger``. ORT docs recommend dynamic quantization for transformers on CPU.
- ``weight_only``: ``MatMulNBitsQuantizer(bits=8)`` -> ``com.microsoft.MatMulNBits`` with int8 blocks
  (``block_size`` along K) dequantised inside the kernel; ``accuracy_level=4`` lets the kernel quantize
  activations to int8 and use integer dot products (VNNI/AMX here).

The lm_head (the last MatMul, onto the vocabulary; a transposed copy of the embedding when tied) is
included by default: on SmolLM2 it is 49152 x 576, ~20% of all MatMul weights. The embedding Gather is
left in FP32 (quantizing it forced opset 21, and the re-versioned graph then failed to load in ONNX Runtime:
"Unrecognized attribute: axes for operator ReduceMean").

``DEFAULT_INT8_METHOD = "weight_only"`` (``accuracy_level=4``, blocks of 32, lm_head included) was
chosen by :func:`compare_int8` on this CPU (AVX512-VNNI/AMX, 1 thread, batch 1; reproduce with
``python -m compress.llm.quant_int8 MODEL.onnx``):

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
SmoothQuant, arXiv:2211.10438): perplexity rose 58 %. Weight-only INT8 with ``accuracy_level=4`` (int8
activations per block of 32, so outliers stay local) keeps perplexity within 1 % and decodes fastest;
without an accuracy level MatMulNBits-8 falls back to a slow path (9x slower than FP32 here).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from compress.errors import ConfigError
from compress.families.causal_lm.export import lm_head_matmul
from compress.onnx_files import copy_model, model_bytes, wants_external_data, write_atomically
from compress.progress import quiet_third_party

Int8Method = Literal["dynamic", "weight_only"]
DEFAULT_INT8_METHOD: Int8Method = "weight_only"


def lm_head_nodes(onnx_path: Path) -> list[str]:
    """Names of the MatMul/Gemm nodes that produce ``logits`` (the lm_head, before any soft-capping)."""
    import onnx

    head = lm_head_matmul(onnx.load(str(onnx_path), load_external_data=False).graph)
    return [head.name] if head is not None else []


def quantize_dynamic_int8(src: Path, dst: Path, *, per_channel: bool = True, include_lm_head: bool = True) -> Path:
    """W8A8 dynamic quantization of every constant-weight MatMul (``onnxruntime.quantization``).

    ONNX Runtime writes a scratch copy beside its input, so it reads a copy of ``src`` in our own
    folder (``copy_model``), never writing into the folder of ``src``.
    """
    exclude = [] if include_lm_head else lm_head_nodes(src)

    def write(tmp: Path) -> None:
        with quiet_third_party():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(
                str(copy_model(Path(src), tmp.parent / "input")),
                str(tmp),
                op_types_to_quantize=["MatMul"],
                per_channel=per_channel,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                use_external_data_format=wants_external_data(Path(src)),
                extra_options={"MatMulConstBOnly": True},
            )

    return write_atomically(Path(dst), write)


def quantize_weight_only_int8(
    src: Path,
    dst: Path,
    *,
    block_size: int = 32,
    accuracy_level: int | None = 4,
    symmetric: bool = True,
    include_lm_head: bool = True,
) -> Path:
    """Weight-only INT8 (``MatMulNBits`` bits=8, blocks of ``block_size`` along K)."""
    import onnx

    with quiet_third_party():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    if block_size < 16 or block_size & (block_size - 1):
        raise ConfigError(f"block_size must be a power of two >= 16; got {block_size}")
    if accuracy_level not in (None, 0, 1, 2, 3, 4):
        raise ConfigError(f"accuracy_level must be one of None, 0-4; got {accuracy_level}")
    exclude = [] if include_lm_head else lm_head_nodes(src)
    model = onnx.load(str(src))
    with quiet_third_party():
        quant = MatMulNBitsQuantizer(
            model,
            bits=8,
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            nodes_to_exclude=exclude,
        )
        quant.process()
    external = wants_external_data(Path(src))

    def write(tmp: Path) -> None:
        quant.model.save_model_to_file(str(tmp), use_external_data_format=external)

    return write_atomically(Path(dst), write)


INT8_METHODS: dict[str, Callable[..., Path]] = {
    "dynamic": quantize_dynamic_int8,
    "weight_only": quantize_weight_only_int8,
}


def quantize_int8(
    src: Path, dst: Path, *, method: Int8Method = DEFAULT_INT8_METHOD, include_lm_head: bool = True
) -> Path:
    """Quantize the decoder at ``src`` to INT8 with ``method`` (default: the measured winner)."""
    if method not in INT8_METHODS:
        raise ConfigError(f"int8 method {method!r} unknown; allowed: {', '.join(INT8_METHODS)}")
    return INT8_METHODS[method](Path(src), Path(dst), include_lm_head=include_lm_head)


@dataclass(frozen=True)
class DecoderTiming:
    """Median latencies (ms) at batch 1: one decode step after ``past`` cached tokens, and a prefill."""

    decode_ms: float
    prefill_ms: float
    past: int
    prefill_tokens: int
    threads: int
    size_mb: float


def measure_decoder(
    onnx_path: Path,
    *,
    threads: int = 1,
    past: int = 127,
    prefill_tokens: int = 128,
    warmup: int = 3,
    iterations: int = 20,
    seed: int = 0,
) -> DecoderTiming:
    """Median decode-step latency (batch 1, ``past`` cached + 1 new) and prefill latency."""
    from compress.families.causal_lm.sessions import OrtCausalLM

    lm = OrtCausalLM(Path(onnx_path), threads=threads)
    vocab = int(lm.info["vocab_size"])
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, vocab, size=(1, prefill_tokens))
    ctx = rng.integers(0, vocab, size=(1, past))
    _, state = lm.prefill(ctx, last_only=True)
    step = rng.integers(0, vocab, size=(1, 1))

    def timed(fn: Callable[[], object], n: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    decode = timed(lambda: lm.decode(step, state), iterations)
    prefill = timed(lambda: lm.prefill(prompt, last_only=True), max(3, iterations // 4))
    return DecoderTiming(decode, prefill, past, prefill_tokens, threads, model_bytes(Path(onnx_path)) / 1e6)


def compare_int8(src: Path, workdir: Path, *, threads: int = 1, iterations: int = 20) -> dict[str, DecoderTiming]:
    """Quantize ``src`` with every candidate (with and without the lm_head) and time each plus FP32."""
    results = {"fp32": measure_decoder(src, threads=threads, iterations=iterations)}
    for name, fn in INT8_METHODS.items():
        for head in (True, False):
            label = f"{name}{'' if head else '-no-lm-head'}"
            out = fn(Path(src), workdir / label / "model.onnx", include_lm_head=head)
            results[label] = measure_decoder(out, threads=threads, iterations=iterations)
    return results


def main(argv: list[str] | None = None) -> None:
    """``python -m compress.llm.quant_int8 MODEL.onnx [--threads 1]``: print the candidate table."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="int8-"))
    results = compare_int8(args.model, workdir, threads=args.threads, iterations=args.iterations)
    print("| variant | decode ms | prefill ms | size MB |")
    print("|---|---|---|---|")
    for label, t in results.items():
        row = asdict(t)
        print(f"| {label} | {row['decode_ms']:.2f} | {row['prefill_ms']:.1f} | {row['size_mb']:.1f} |")


if __name__ == "__main__":
    main()
