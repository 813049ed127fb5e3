"""Decoder benchmarks: prefill latency, time to first token, decode tokens/s, peak RSS, size, and the
memory-bandwidth bound of decode, for any decoder session (`compress.backends.DecoderSession`).

    res = bench_decoder(session, vocab_size=..., weight_bytes=onnx_weight_bytes(path), size_bytes=..., threads=1)

`compress run` calls it through the causal-lm adapter's `benchmark`; scripts/peer_llm.py for peers' files.

Decode at small batch reads every weight once per token, so ``weight bytes / memory bandwidth`` is a
floor on the step time (the "memory wall" argument of e.g. Kim et al. 2023, SqueezeLLM, arXiv:2306.07629).
Bandwidth is measured here with a numpy copy of a large array (read + write traffic / time), so the bound
is this machine's, not a datasheet's. Torch and ONNX Runtime go through the same ``prefill``/``decode``
session protocol and the same timing code. A decoder with its own generation loop (onnxruntime-genai's
Generator, `compress.families.causal_lm.genai_engine.GeneratorBench`) times its steps itself
(``timed_decode``); ``engine`` in the result names what produced the figures.
Timings are medians; fix ``threads`` and run on a quiet machine (2 busy threads on 2 cores distort them).
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compress.bench.harness import copy_bandwidth_gbs

if TYPE_CHECKING:
    from compress.backends import DecoderSession


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
    engine: str = ""  # what drove the backend: the session itself, or e.g. onnxruntime-genai's Generator
    prefill_ms: dict[int, float] = field(default_factory=dict)
    ttft_ms: dict[int, float] = field(default_factory=dict)
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)
    decode_step_ms: dict[int, float] = field(default_factory=dict)
    # batch-1 decode tokens/s after a prompt of each length (the KV cache a step attends over grows with it)
    decode_tokens_per_s_by_prompt: dict[int, float] = field(default_factory=dict)
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


def _decode_step_ms(decoder: DecoderSession | Any, ctx: np.ndarray, decode_tokens: int, rounds: int) -> float:
    """Median ms of one greedy decode step after prefilling `ctx` (B, T), over `rounds` x `decode_tokens` steps."""
    steps_ms: list[float] = []
    timed = getattr(decoder, "timed_decode", None)
    for _ in range(rounds):
        if timed is not None:  # an engine with its own loop (the Generator picks its tokens itself)
            steps_ms += timed(ctx, decode_tokens)
            continue
        logits, state = decoder.prefill(ctx, last_only=True)
        for _ in range(decode_tokens):
            nxt = logits[:, -1].argmax(-1)[:, None]  # (B, 1)
            t0 = time.perf_counter()
            logits, state = decoder.decode(nxt, state)
            steps_ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(steps_ms)


def bench_decoder(
    decoder: DecoderSession | Any,
    *,
    vocab_size: int,
    weight_bytes: int,
    size_bytes: int,
    threads: int | None,
    prompt_lengths: Sequence[int] = (32, 128, 512),
    batch_sizes: Sequence[int] = (1, 4),
    decode_context: int = 128,
    decode_tokens: int = 32,
    decode_prompt_lengths: Sequence[int] = (),
    warmup: int = 2,
    iterations: int = 5,
    seed: int = 0,
    bandwidth_gbs: float | None = None,
) -> LLMBench:
    """Time prefill and TTFT at each prompt length (batch 1), decode at each batch size, and batch-1 decode
    after each of ``decode_prompt_lengths`` (the sweep; ``decode_context`` is always one of its points).

    TTFT = prefill of the prompt (last-position logits only) + the argmax of the first token. Decode runs
    ``decode_tokens`` greedy steps after a ``decode_context``-token prompt; tokens/s counts every row.
    ``bandwidth_gbs`` is measured with :func:`compress.bench.harness.copy_bandwidth_gbs` when not given.
    """
    if not prompt_lengths or min(prompt_lengths) < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"prompt_lengths {prompt_lengths} and batch_sizes {batch_sizes} must be >= 1")
    if decode_prompt_lengths and min(decode_prompt_lengths) < 1:
        raise ValueError(f"decode_prompt_lengths {decode_prompt_lengths} must be >= 1")
    rng = np.random.default_rng(seed)
    res = LLMBench(decoder.backend, threads, engine=getattr(decoder, "engine", decoder.backend))
    for n in prompt_lengths:
        ids = rng.integers(0, vocab_size, size=(1, n))
        res.prefill_ms[n] = _median_ms(lambda ids=ids: decoder.prefill(ids, last_only=True), warmup, iterations)
        res.ttft_ms[n] = _median_ms(
            lambda ids=ids: int(decoder.prefill(ids, last_only=True)[0][0, -1].argmax()), warmup, iterations
        )
    rounds = max(1, iterations // 2)
    for b in batch_sizes:
        step = _decode_step_ms(decoder, rng.integers(0, vocab_size, size=(b, decode_context)), decode_tokens, rounds)
        res.decode_step_ms[b] = step
        res.decode_tokens_per_s[b] = b * 1e3 / step
    for n in sorted({decode_context, *decode_prompt_lengths}):
        if n == decode_context and 1 in res.decode_step_ms:  # measured above: the default sweep costs nothing
            step = res.decode_step_ms[1]
        else:
            step = _decode_step_ms(decoder, rng.integers(0, vocab_size, size=(1, n)), decode_tokens, rounds)
        res.decode_tokens_per_s_by_prompt[n] = 1e3 / step
    res.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    res.size_mb = size_bytes / 1e6
    res.weight_mb = weight_bytes / 1e6
    res.bandwidth_gbs = copy_bandwidth_gbs() if bandwidth_gbs is None else bandwidth_gbs
    res.decode_bound_ms = weight_bytes / (res.bandwidth_gbs * 1e9) * 1e3
    return res
