"""onnxruntime-genai's Generator as the engine of a genai artifact (a folder with genai_config.json, written
by `target: onnxruntime-genai`): the deployable runtime, token by token.

    model = open_genai_model(folder, threads=2)
    result = genai_generate(model, [[1, 2, 3]], GenerationOptions(max_new_tokens=16), on_token=print)

GenerationOptions map onto `GeneratorParams.set_search_options` one to one (`max_length` = prompt + new
tokens, `random_seed` = seed, `early_stopping=False` as HF's default and our engine). What differs from
`compress.families.causal_lm.generate`, said here because results are compared across the two:

- Stop tokens: the Generator always stops at the model's EOS; `stop_token_ids`, when given, replace the
  config's `eos_token_id` (genai has no "never stop"; an id must be within the vocabulary).
- Sampling: genai's own sampler and random stream, so the same seed gives the same tokens run after run
  within genai, but not the tokens our numpy sampler draws. Greedy and beam search are deterministic in both.
- One prompt at a time (the Generator's batch needs padded prompts; deployment decodes one stream).

`GeneratorBench` puts the Generator behind the decoder benchmark (`compress.bench.decoder`): a genai
artifact's prefill and decode figures are those of the runtime a deployer runs.

onnxruntime-genai is imported lazily: it is the `llm` extra.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compress.families.causal_lm.generate import GenerationOptions, GenerationResult

GENAI_CONFIG = "genai_config.json"


def is_genai_folder(folder: Path) -> bool:
    """True when `folder` holds onnxruntime-genai's config beside its graph."""
    return (Path(folder) / GENAI_CONFIG).is_file()


def open_genai_model(folder: Path, *, threads: int | None = None, stop_token_ids: Sequence[int] = ()) -> Any:
    """`og.Model` of `folder`, its decoder session on `threads` intra-op threads, EOS replaced if asked."""
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise RuntimeError("onnxruntime-genai is not installed (pip install 'compress[llm]')") from exc
    if not is_genai_folder(folder):
        raise FileNotFoundError(f"{folder}: no {GENAI_CONFIG}; not an onnxruntime-genai artifact")
    overlay: dict[str, Any] = {}
    if threads is not None:
        overlay["decoder"] = {"session_options": {"intra_op_num_threads": int(threads)}}
    if stop_token_ids:
        overlay["eos_token_id"] = [int(t) for t in stop_token_ids]
    config = og.Config(str(folder))
    if overlay:
        config.overlay(json.dumps({"model": overlay}))
    return og.Model(config)


def search_options(options: GenerationOptions, prompt_length: int) -> dict[str, Any]:
    """`set_search_options` keywords for `options` and a prompt of `prompt_length` tokens."""
    opts: dict[str, Any] = {
        "max_length": prompt_length + options.max_new_tokens,
        "do_sample": options.do_sample,
        "temperature": options.temperature,
        "top_k": options.top_k,  # 0 = off, as ours (genai's config default is 50)
        "top_p": options.top_p,
        "num_beams": options.num_beams,
        "length_penalty": options.length_penalty,
        "early_stopping": False,
        "repetition_penalty": options.repetition_penalty,
        "no_repeat_ngram_size": options.no_repeat_ngram_size,
    }
    if options.seed is not None:
        opts["random_seed"] = options.seed
    return opts


def genai_generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    options: GenerationOptions,
    *,
    on_token: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Generate for each prompt with the Generator of `model` (an `og.Model`).

    `on_token(row, token)` is called as each token comes (greedy and sampling; beam search knows its best
    hypothesis only at the end, so its tokens are reported then)."""
    import onnxruntime_genai as og

    tokens: list[list[int]] = []
    reasons: list[str] = []
    prefill_s = decode_s = 0.0
    steps = 0
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError("genai_generate: every prompt needs at least one token")
        out: list[int] = []
        if options.max_new_tokens == 0:
            tokens.append(out)
            reasons.append("length")
            continue
        params = og.GeneratorParams(model)
        params.set_search_options(**search_options(options, len(prompt)))
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(np.asarray([prompt], dtype=np.int32))  # the prefill
        prefill_s += time.perf_counter() - start
        start = time.perf_counter()
        first = True
        while not generator.is_done():
            generator.generate_next_token()
            steps += 0 if first else 1  # the first token comes from the prefill's logits
            first = False
            if options.num_beams == 1:
                out.append(int(generator.get_next_tokens()[0]))
                if on_token is not None:
                    on_token(row, out[-1])
        if options.num_beams > 1:
            out = [int(t) for t in generator.get_sequence(0)[len(prompt) :]]
            for t in out if on_token is not None else ():
                on_token(row, t)
        decode_s += time.perf_counter() - start
        tokens.append(out)
        reasons.append("length" if len(out) >= options.max_new_tokens else "stop")
    # decode steps per prompt, so that `decode_tokens_per_second` (steps x rows / seconds) counts every row's
    return GenerationResult(tokens, reasons, prefill_s, decode_s, steps // max(len(prompts), 1))


class GeneratorBench:
    """onnxruntime-genai's Generator in the shape `compress.bench.decoder.bench_decoder` times.

    ``prefill(ids)``: a fresh Generator (its KV buffer allocated for the prompt) and ``append_tokens``, the
    prompt's forward pass. ``timed_decode(ctx, n)``: after that prefill, the Generator's own greedy loop;
    the first ``generate_next_token`` only picks a token from the prefill's logits and is not timed, each of
    the next ``n`` runs one forward step plus the search, timed one by one. ``min_length`` keeps EOS from
    ending the loop early, so every row decodes exactly ``n`` tokens. Equal-length rows need no padding,
    so batch ``B`` is one Generator of batch size ``B``.
    """

    backend = "onnxruntime"  # the runtime underneath; `engine` is what drives it
    engine = "onnxruntime-genai"

    def __init__(self, folder: Path, *, threads: int | None = None) -> None:
        self.model = open_genai_model(folder, threads=threads)
        self.vocab_size = int(json.loads((Path(folder) / GENAI_CONFIG).read_text())["model"]["vocab_size"])

    def _generator(self, ids: np.ndarray, new_tokens: int) -> Any:
        import onnxruntime_genai as og

        batch, length = ids.shape  # (B, T)
        params = og.GeneratorParams(self.model)
        total = length + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=batch)
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.ascontiguousarray(ids, dtype=np.int32))
        return generator

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *, last_only: bool = True
    ) -> tuple[np.ndarray, Any]:
        """Last-position logits (B, 1, V) of the prompt and the Generator holding its cache."""
        if attention_mask is not None or not last_only:
            raise ValueError("GeneratorBench.prefill: unpadded prompts and last-position logits only")
        generator = self._generator(input_ids, 1)
        return generator.get_logits(), generator

    def timed_decode(self, input_ids: np.ndarray, new_tokens: int) -> list[float]:
        """Milliseconds of each of ``new_tokens`` greedy steps after the prompt ``input_ids`` (B, T)."""
        generator = self._generator(input_ids, new_tokens + 1)
        generator.generate_next_token()  # the first token, from the prefill's logits: no forward pass
        steps = []
        for _ in range(new_tokens):
            start = time.perf_counter()
            generator.generate_next_token()
            steps.append((time.perf_counter() - start) * 1e3)
        if not generator.is_done() or len(generator.get_sequence(0)) != input_ids.shape[1] + new_tokens + 1:
            raise RuntimeError("onnxruntime-genai Generator did not decode the requested number of tokens")
        return steps
