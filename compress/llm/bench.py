"""LLM benchmarks: prefill latency, time to first token, decode tokens/s, peak RSS, size, and the
memory-bandwidth bound of decode, for an ONNX Runtime decoder and for a torch model alike.

    python -m compress.llm.bench runs/x/model.onnx --threads 1

Decode at small batch reads every weight once per token, so ``weight bytes / memory bandwidth`` is a
floor on the step time (the "memory wall" argument of e.g. Kim et al. 2023, SqueezeLLM, arXiv:2306.07629).
Bandwidth is measured here with a numpy copy of a large array (read + write traffic / time), so the bound
is this machine's, not a datasheet's. Both backends go through the same ``prefill``/``decode`` interface
(:class:`TorchDecoder` mirrors :class:`~compress.llm.generate.OrtCausalLM`) and the same timing code.
Timings are medians; fix ``threads`` and run on a quiet machine (2 busy threads on 2 cores distort them).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from compress.bench.harness import copy_bandwidth_gbs
from compress.errors import ConfigError


class Decoder(Protocol):
    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *, last_only: bool = False
    ) -> tuple[np.ndarray, Any]: ...

    def decode(self, input_ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]: ...


class TorchDecoder:
    """A transformers causal LM behind the ``prefill``/``decode`` interface of ``OrtCausalLM``."""

    def __init__(self, model: Any, *, threads: int | None = None) -> None:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self.model = model.eval()
        self._torch = torch

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *, last_only: bool = False
    ) -> tuple[np.ndarray, Any]:
        torch = self._torch
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        mask = torch.ones_like(ids) if attention_mask is None else torch.from_numpy(attention_mask)
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1 if last_only else 0)
        return out.logits.numpy(), (out.past_key_values, mask)

    def decode(self, input_ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        torch = self._torch
        past, mask = state
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True)
        return out.logits.numpy(), (out.past_key_values, mask)


def onnx_weight_bytes(onnx_path: Path, *, decode_only: bool = True) -> int:
    """Bytes of the initializers of an ONNX file; with ``decode_only`` those a decode step reads in
    full, i.e. without tables used only as the data of a ``Gather`` (an embedding reads one row per
    token)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(str(onnx_path), load_external_data=False)
    gather_only: set[str] = set()
    if decode_only:
        consumers: dict[str, list[tuple[str, int]]] = {}
        for node in proto.graph.node:
            for slot, name in enumerate(node.input):
                consumers.setdefault(name, []).append((node.op_type, slot))
        gather_only = {n for n, uses in consumers.items() if all(u == ("Gather", 0) for u in uses)}
    total = 0
    for t in proto.graph.initializer:
        if t.name in gather_only:
            continue
        if uses_external_data(t):
            total += int(next(e.value for e in t.external_data if e.key == "length"))
        else:
            total += len(t.raw_data) or t.ByteSize()
    return total


def torch_weight_bytes(model: Any, *, decode_only: bool = True) -> int:
    """Bytes of a torch model's distinct parameters; with ``decode_only`` an untied input embedding
    (read one row per token) is left out."""
    params = {id(p): p for p in model.parameters()}
    if decode_only:
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        if emb is not None and (head is None or head.weight is not emb.weight):
            params.pop(id(emb.weight), None)
    return sum(p.numel() * p.element_size() for p in params.values())


def file_bytes(path: Path) -> int:
    """Size on disk of an ONNX file with its external data, or of a folder's files."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


@dataclass
class LLMBench:
    """One backend's figures. Latencies in ms (medians), throughput in generated tokens/s."""

    backend: str
    threads: int | None
    prefill_ms: dict[int, float] = field(default_factory=dict)
    ttft_ms: dict[int, float] = field(default_factory=dict)
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)
    decode_step_ms: dict[int, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    size_mb: float = 0.0
    weight_mb: float = 0.0  # weights a decode step reads in full (embedding tables excluded)
    bandwidth_gbs: float = 0.0
    decode_bound_ms: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def _median_ms(fn: Callable[[], object], warmup: int, iterations: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_decoder(
    decoder: Decoder,
    *,
    backend: str,
    vocab_size: int,
    weight_bytes: int,
    size_bytes: int,
    threads: int | None,
    prompt_lengths: Sequence[int] = (32, 128, 512),
    batch_sizes: Sequence[int] = (1, 4),
    decode_context: int = 128,
    decode_tokens: int = 32,
    warmup: int = 2,
    iterations: int = 5,
    seed: int = 0,
    bandwidth_gbs: float | None = None,
) -> LLMBench:
    """Time prefill and TTFT at each prompt length (batch 1), and decode at each batch size.

    TTFT = prefill of the prompt (last-position logits only) + the argmax of the first token. Decode runs
    ``decode_tokens`` greedy steps after a ``decode_context``-token prompt; tokens/s counts every row.
    ``bandwidth_gbs`` is measured with :func:`compress.bench.harness.copy_bandwidth_gbs` when not given.
    """
    if not prompt_lengths or min(prompt_lengths) < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(f"prompt_lengths {prompt_lengths} and batch_sizes {batch_sizes} must be >= 1")
    rng = np.random.default_rng(seed)
    res = LLMBench(backend, threads)
    for n in prompt_lengths:
        ids = rng.integers(0, vocab_size, size=(1, n))
        res.prefill_ms[n] = _median_ms(lambda ids=ids: decoder.prefill(ids, last_only=True), warmup, iterations)
        res.ttft_ms[n] = _median_ms(
            lambda ids=ids: int(decoder.prefill(ids, last_only=True)[0][0, -1].argmax()), warmup, iterations
        )
    for b in batch_sizes:
        ctx = rng.integers(0, vocab_size, size=(b, decode_context))
        steps_ms = []
        for _ in range(max(1, iterations // 2)):
            logits, state = decoder.prefill(ctx, last_only=True)
            for _ in range(decode_tokens):
                nxt = logits[:, -1].argmax(-1)[:, None]  # (B, 1)
                t0 = time.perf_counter()
                logits, state = decoder.decode(nxt, state)
                steps_ms.append((time.perf_counter() - t0) * 1e3)
        step = statistics.median(steps_ms)
        res.decode_step_ms[b] = step
        res.decode_tokens_per_s[b] = b * 1e3 / step
    res.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    res.size_mb = size_bytes / 1e6
    res.weight_mb = weight_bytes / 1e6
    res.bandwidth_gbs = copy_bandwidth_gbs() if bandwidth_gbs is None else bandwidth_gbs
    res.decode_bound_ms = weight_bytes / (res.bandwidth_gbs * 1e9) * 1e3
    return res


def bench_onnx(onnx_path: Path, *, threads: int | None = 1, **kwargs: Any) -> LLMBench:
    """Benchmark an ONNX decoder in ONNX Runtime (CPU). ``peak_rss_mb`` is this process's peak: run it
    in a fresh process (the CLI below does) for a clean figure."""
    from compress.llm.generate import OrtCausalLM

    lm = OrtCausalLM(Path(onnx_path), threads=threads)
    return bench_decoder(
        lm,
        backend="onnxruntime-cpu",
        vocab_size=int(lm.info["vocab_size"]),
        weight_bytes=onnx_weight_bytes(Path(onnx_path)),
        size_bytes=file_bytes(Path(onnx_path)),
        threads=threads,
        **kwargs,
    )


def bench_torch(model: Any, *, threads: int | None = 1, size_bytes: int | None = None, **kwargs: Any) -> LLMBench:
    """Benchmark a transformers causal LM in torch eager (CPU)."""
    size = torch_weight_bytes(model, decode_only=False) if size_bytes is None else size_bytes
    return bench_decoder(
        TorchDecoder(model, threads=threads),
        backend="torch",
        vocab_size=int(model.config.vocab_size),
        weight_bytes=torch_weight_bytes(model),
        size_bytes=size,
        threads=threads,
        **kwargs,
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m compress.llm.bench MODEL.onnx|SOURCE [--threads 1]``: print the figures as JSON.

    A path ending in .onnx runs in ONNX Runtime; anything else is a model source for torch
    (``hf:``, ``gguf:``, ``pkg:``, ``python:``; converted GGUF is cached in ``--cache-dir``).
    """
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/compress"))
    args = parser.parse_args(argv)
    common = {"prompt_lengths": args.prompt_lengths, "batch_sizes": args.batch_sizes, "iterations": args.iterations}
    if args.model.endswith(".onnx"):
        res = bench_onnx(Path(args.model), threads=args.threads, **common)
    else:
        from compress.llm.sources import load_causal_lm

        model, _ = load_causal_lm(args.model, cache_dir=args.cache_dir)
        res = bench_torch(model, threads=args.threads, **common)
    sys.stdout.write(res.to_json() + "\n")


if __name__ == "__main__":
    main()
