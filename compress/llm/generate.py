"""ONNX Runtime text generation over a KV-cache decoder exported by :mod:`compress.llm.onnx_export`.

    lm = OrtCausalLM(Path("model.onnx"), threads=2)
    result = lm.generate([[1, 2, 3]], GenerationOptions(max_new_tokens=16))
    logits = lm.logits(np.array([[1, 2, 3]]))     # (B, T, V), for perplexity

The prompt batch is left-padded (pad positions have mask 0 and position ids start at each row's first
real token), one prefill run fills the cache, then each decode step feeds the ``present.*`` outputs back
as ``past_key_values.*``. With ``io_binding=True`` (the default) the presents stay ``OrtValue`` objects
between steps and are bound as the next inputs, so they never round-trip through numpy; only the last
position's logits are copied out. The logits processors follow Hugging Face ``generate`` semantics:
repetition penalty (Keskar et al. 2019, CTRL, arXiv:1909.05858), temperature, top-k, then nucleus /
top-p (Holtzman et al. 2019, arXiv:1904.09751).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from compress.errors import ConfigError
from compress.llm.onnx_export import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, describe_io


class GenerationOptions(BaseModel):
    """How to pick the next token; defaults are greedy decoding of 32 tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(32, ge=0, description="Tokens to generate per prompt at most.")
    do_sample: bool = Field(False, description="Sample from the processed distribution; False = greedy.")
    temperature: float = Field(1.0, gt=0.0, description="Divide logits by this before sampling.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens when sampling; 0 = all.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Keep the smallest set with this probability mass.")
    repetition_penalty: float = Field(
        1.0, gt=0.0, description="CTRL penalty on tokens already in the sequence; 1.0 = off."
    )
    stop_token_ids: tuple[int, ...] = Field((), description="A row stops after emitting one of these.")
    seed: int | None = Field(None, description="Seed of the sampler; same seed, same tokens.")
    pad_token_id: int = Field(0, ge=0, description="Id used for left padding and after a row stops.")


@dataclass
class GenerationResult:
    """New tokens per prompt (stop token included), why each row ended, and wall-clock timings."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int

    @property
    def decode_tokens_per_second(self) -> float:
        """Per-row decode rate × batch: tokens produced by decode steps per second."""
        produced = self.decode_steps * len(self.tokens)
        return produced / self.decode_seconds if self.decode_seconds > 0 else float("nan")


@dataclass
class KVState:
    """Cache between runs: presents (numpy arrays or OrtValues), the attention mask so far (B, total)."""

    past: dict[str, Any]
    attention_mask: np.ndarray

    @property
    def length(self) -> int:
        return int(self.attention_mask.shape[1])


class OrtCausalLM:
    """A KV-cache decoder in ONNX Runtime: ``logits`` for metrics, ``generate`` for text."""

    def __init__(
        self,
        onnx_path: Path,
        *,
        threads: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        io_binding: bool = True,
    ) -> None:
        import onnxruntime as ort

        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise ConfigError(f"ONNX decoder {onnx_path} not found")
        info = describe_io(onnx_path)
        names = {r["name"] for r in info["inputs"]}
        missing = {INPUT_IDS, ATTENTION_MASK, POSITION_IDS} - names
        if missing or not info["num_layers"]:
            raise ConfigError(
                f"{onnx_path} is not a KV-cache decoder: inputs {sorted(names)}; needs input_ids, "
                "attention_mask, position_ids and past_key_values.{i}.key/value (see onnx_export)"
            )
        self.path = onnx_path
        self.info = info
        self.num_layers = int(info["num_layers"])
        self.num_kv_heads = int(info["num_kv_heads"])
        self.head_dim = int(info["head_dim"])
        self.kv_dtype = np.dtype(info["kv_dtype"])
        self.past_names = [r["name"] for r in info["inputs"] if r["name"].startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=list(providers))
        self.io_binding = io_binding
        self._ort = ort

    # -- one forward ------------------------------------------------------------------------------
    def _run(self, ids: np.ndarray, state: KVState, last_only: bool) -> tuple[np.ndarray, KVState]:
        batch, seq = ids.shape  # (B, T)
        mask = state.attention_mask
        positions = np.cumsum(mask, axis=1)[:, -seq:] - 1  # (B, T)
        positions = np.maximum(positions, 0).astype(np.int64)
        feeds = {INPUT_IDS: ids, ATTENTION_MASK: mask, POSITION_IDS: positions}
        if not self.io_binding:
            outs = self.session.run(None, {**feeds, **state.past})
            out_names = [o.name for o in self.session.get_outputs()]
            by_name = dict(zip(out_names, outs, strict=True))
            logits = by_name[LOGITS]
            past = {p: by_name[q] for p, q in zip(self.past_names, self.present_names, strict=True)}
            return (logits[:, -1:] if last_only else logits), KVState(past, mask)
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in state.past.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(LOGITS, "cpu")
        for name in self.present_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()  # OrtValues in output-binding order
        logits_val = outs[0]
        logits = logits_val.numpy()
        past = dict(zip(self.past_names, outs[1:], strict=True))
        return (logits[:, -1:] if last_only else logits), KVState(past, mask)

    def empty_state(self, attention_mask: np.ndarray) -> KVState:
        batch = attention_mask.shape[0]
        empty = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), dtype=self.kv_dtype)  # (B, H, 0, D)
        return KVState({name: empty for name in self.past_names}, np.zeros((batch, 0), dtype=np.int64))

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *, last_only: bool = False
    ) -> tuple[np.ndarray, KVState]:
        """Run the prompt with an empty cache; returns logits (B, T, V) (or (B, 1, V)) and the cache."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, sequence); got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        state = self.empty_state(mask)
        state.attention_mask = mask
        return self._run(ids, state, last_only)

    def decode(self, input_ids: np.ndarray, state: KVState) -> tuple[np.ndarray, KVState]:
        """Append ``input_ids`` (B, T) (usually T = 1) to the cache; returns logits (B, T, V)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.concatenate([state.attention_mask, np.ones_like(ids)], axis=1)  # (B, total)
        return self._run(ids, KVState(state.past, mask), last_only=False)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Full logits (B, T, V) of a batch of unpadded windows: the ``logits_fn`` of the metrics."""
        return self.prefill(input_ids)[0]

    # -- generation -------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Sequence[int]] | np.ndarray, options: GenerationOptions | None = None
    ) -> GenerationResult:
        """Generate for a batch of token-id prompts (left-padded internally)."""
        opts = options or GenerationOptions()
        rows = [list(map(int, p)) for p in prompts]
        if not rows or any(len(r) == 0 for r in rows):
            raise ConfigError("generate: every prompt needs at least one token")
        batch, width = len(rows), max(len(r) for r in rows)
        ids = np.full((batch, width), opts.pad_token_id, dtype=np.int64)  # (B, T) left padded
        mask = np.zeros((batch, width), dtype=np.int64)
        for b, r in enumerate(rows):
            ids[b, width - len(r) :] = r
            mask[b, width - len(r) :] = 1
        rng = np.random.default_rng(opts.seed)
        out: list[list[int]] = [[] for _ in rows]
        reasons = ["length"] * batch
        done = np.zeros(batch, dtype=bool)
        if opts.max_new_tokens == 0:
            return GenerationResult(out, reasons, 0.0, 0.0, 0)
        start = time.perf_counter()
        logits, state = self.prefill(ids, mask, last_only=True)
        prefill_s = time.perf_counter() - start
        vocab = logits.shape[-1]
        seen = np.zeros((batch, vocab), dtype=bool)  # tokens in each sequence, for the repetition penalty
        for b, r in enumerate(rows):
            seen[b, [t for t in r if t < vocab]] = True
        stops = set(opts.stop_token_ids)
        steps = 0
        start = time.perf_counter()
        for i in range(opts.max_new_tokens):
            nxt = next_tokens(logits[:, -1], seen, opts, rng)  # (B,)
            for b in range(batch):
                if done[b]:
                    nxt[b] = opts.pad_token_id
                    continue
                tok = int(nxt[b])
                out[b].append(tok)
                seen[b, tok] = True
                if tok in stops:
                    done[b], reasons[b] = True, "stop"
            if done.all() or i == opts.max_new_tokens - 1:
                break
            logits, state = self.decode(nxt[:, None], state)
            steps += 1
        return GenerationResult(out, reasons, prefill_s, time.perf_counter() - start, steps)


def next_tokens(logits: np.ndarray, seen: np.ndarray, opts: GenerationOptions, rng: np.random.Generator) -> np.ndarray:
    """Pick one token per row from last-position logits (B, V), in Hugging Face processor order."""
    scores = logits.astype(np.float64)
    if opts.repetition_penalty != 1.0:
        penalised = np.where(scores > 0, scores / opts.repetition_penalty, scores * opts.repetition_penalty)
        scores = np.where(seen, penalised, scores)
    if not opts.do_sample:
        return scores.argmax(axis=-1).astype(np.int64)
    scores = scores / opts.temperature
    if 0 < opts.top_k < scores.shape[-1]:
        kth = np.partition(scores, -opts.top_k, axis=-1)[:, -opts.top_k][:, None]  # (B, 1)
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if opts.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        keep_sorted = (np.cumsum(sorted_p, axis=-1) - sorted_p) < opts.top_p  # always keeps the first
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    cdf = np.cumsum(probs, axis=-1)  # (B, V)
    u = rng.random(probs.shape[0])[:, None] * cdf[:, -1:]
    return np.minimum((cdf < u).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)
