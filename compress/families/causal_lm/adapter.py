"""The `causal-lm` adapter: decoder LLMs with an architecture map (`archs.py`), composed of the family's
`options`, `model_io` (sources `hf:NAME_OR_FOLDER`, `gguf:PATH`, `pkg:DIST/PATH`, `python:module:function`;
torch artifacts are Hugging Face folders), `export` (KV-cache ONNX decoders, one graph for prefill and
decode), `task` (windows, metrics) and `sessions` (registered with `compress.backends` as kind "decoder").

Evaluation: perplexity over non-overlapping evaluation windows, next-token top-1 agreement with the
baseline, and greedy continuations of a few prompts compared with the baseline's (first divergence); with
`data.texts`, also the perplexity `ppl:NAME` of each further text and its rise `ppl_rise_pct:NAME` (gates
read the primary text's `ppl` only).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from compress.errors import ConfigError
from compress.families.base import Adapter, Evaluation, IOSpec, QualityMetric, ReportView
from compress.families.causal_lm import sessions  # noqa: F401  (registers the decoder sessions with backends)
from compress.families.causal_lm.linked import LINK_FILE, NOT_MATERIALISED, LinkedSource, link_folder, link_problem
from compress.families.causal_lm.model_io import is_gguf
from compress.families.causal_lm.options import PRIMARY_TEXT, CausalLMModelOptions, TextDataOptions, TextSource
from compress.progress import quiet_third_party
from compress.prune.options import DECODER_PRUNING
from compress.quant.vocab import INT4_ALGORITHMS, INT8_METHODS, TARGETS
from compress.registry import register_adapter

if TYPE_CHECKING:
    import torch

    from compress.artifact import Artifact
    from compress.backends import DecoderSession
    from compress.config import BenchOptions
    from compress.families.causal_lm.task import PerplexityResult, TextSplits
    from compress.progress import Reporter
    from compress.prune.options import PruneOptions
    from compress.stages.base import StageOutput


@register_adapter("causal-lm")
class CausalLMAdapter(Adapter):
    # -- what this family's models can take (see Adapter: stages and distillation ask these) ----------------
    stage_kinds: ClassVar[frozenset[str]] = frozenset({"prune", "distill", "export", "quantize"})
    distill_task: ClassVar[str | None] = "causal-lm"
    model_options = CausalLMModelOptions
    data_options = TextDataOptions
    quality = QualityMetric(
        "ppl",
        "%",
        "ppl_rise_pct",
        higher_is_better=False,
        alias="ppl_rise_max",
        detail="perplexity {ours:.3f} vs {theirs:.3f}",
    )
    measures_decode = True
    session_kind = "decoder"
    default_int8_method = "weight-only"
    int4_targets = frozenset(TARGETS)  # onnxruntime-genai's builder takes decoder LLMs
    int4_methods = frozenset(INT4_ALGORITHMS)  # autoround included: it needs a decoder and its tokenizer
    int8_methods = frozenset(INT8_METHODS)  # smoothquant: its scales fold into the decoder layers (archs.py)
    calibration_batch_size = 1  # one window per forward
    comparisons = (
        ("ppl_rise_pct", "perplexity rise %", 1),
        ("agreement", "next-token agreement %", 1),
        ("greedy_identical", "identical greedy continuations %", 1),
    )
    prune_support = DECODER_PRUNING
    model_cfg: CausalLMModelOptions
    data_cfg: TextDataOptions

    @property  # type: ignore[override]
    def metric_names(self) -> tuple[str, ...]:  # one perplexity per text of `data.texts` after the primary's
        return ("ppl", *(f"ppl:{name}" for name in self.data_cfg.texts))

    # -- checks before any work ----------------------------------------------------------------------
    def preflight(self) -> list[tuple[tuple[str | int, ...], str]]:
        from compress.families.causal_lm.model_io import gguf_header_problem, source_decoder_problem
        from compress.sources import SCHEMES, local_target, parse_source, remote_code_problem

        problems = self._text_problems()
        try:
            scheme, rest = local_target(*parse_source(self.model_cfg.source))
            if self.model_cfg.link and (problem := link_problem(scheme, rest)):
                problems.append((("model", "link"), problem))
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
        """A text that reads nothing (a path, or fortunes not installed), found before the model loads."""
        from compress.families.causal_lm.task import text_files

        problems: list[tuple[tuple[str | int, ...], str]] = []
        for keys, source in self._sources():
            if source.kind == "pydoc":
                continue
            key = ".".join(keys)
            try:
                text_files(source, key)
            except ConfigError as exc:
                message = str(exc)
                field = next((f for f in ("path", "files") if message.startswith(f"{key}.{f}: ")), None)
                where = (*keys, field) if field else keys
                problems.append((where, message.removeprefix(".".join(where) + ": ")))
        return problems

    def _sources(self) -> list[tuple[tuple[str, ...], TextSource]]:
        """Every text source with its key path: data.text first, then data.texts in their order."""
        return [(("data", "text"), self.data_cfg.text)] + [
            (("data", "texts", name), source) for name, source in self.data_cfg.texts.items()
        ]

    # -- model ---------------------------------------------------------------------------------------
    @cached_property
    def _loaded(self) -> tuple[Any, Any]:
        from compress.families.causal_lm.model_io import load_causal_lm
        from compress.sources import quiet_transformers

        quiet_transformers()
        cached = " (a GGUF is converted once and cached)" if is_gguf(self.model_cfg.source) else ""
        self.reporter.log(f"  loading {self.model_cfg.source}{cached}")
        model, tokenizer = load_causal_lm(
            self.model_cfg.source,
            cache_dir=self.cache_dir / "models",
            trust_remote_code=self.model_cfg.trust_remote_code,
        )
        if tokenizer is None:
            raise ValueError(f"model.source = {self.model_cfg.source}: no tokenizer found with the model")
        return model, tokenizer

    @cached_property
    def tokenizer(self) -> Any:
        if self.links_source:  # the tokenizer alone: the weights stay where they are
            from compress.families.causal_lm.linked import load_tokenizer

            return load_tokenizer(
                self._linked_folder, self.model_cfg.source, trust_remote_code=self.model_cfg.trust_remote_code
            )
        return self._loaded[1]

    @cached_property
    def _linked_folder(self) -> Path:
        """A linked source's folder (a GGUF's is its conversion, made once under the models cache)."""
        from compress.families.causal_lm.linked import linked_folder

        if is_gguf(self.model_cfg.source):
            self.reporter.log(f"  {self.model_cfg.source}: converted once, shard by shard (a verified copy is reused)")
        return linked_folder(self.model_cfg.source, self.cache_dir / "models")

    def source_fingerprint(self) -> dict[str, Any]:
        from compress.sources import source_fingerprint

        fingerprint = source_fingerprint(self.model_cfg.source, cache_dir=self.cache_dir)
        return {"source": self.model_cfg.source, "fingerprint": fingerprint}

    def load_source(self) -> tuple[torch.nn.Module, bool]:
        return self._loaded[0], True

    def link_source(self, folder: Path) -> StageOutput:
        from compress.stages.base import StageOutput

        linked = link_folder(self._linked_folder, self.tokenizer, folder, self.cache_dir)
        self.reporter.log(f"  linked {len(linked.files)} files of {linked.folder} ({linked.total_bytes / 1e9:.2f} GB)")
        info = {"linked": str(linked.folder), "linked_files": len(linked.files), "linked_bytes": linked.total_bytes}
        return StageOutput(
            file=LINK_FILE, format="torch", precision=linked.precision, info=info, unmeasured=NOT_MATERIALISED
        )

    def weights_folder(self, artifact: Artifact) -> Path:
        linked = LinkedSource.read(artifact.path)
        return artifact.path if linked is None else linked.verify(self.cache_dir)

    def notes(self) -> list[str]:
        """Facts about the source a reader of the numbers must know (e.g. weights published at 4 bits)."""
        from compress.families.causal_lm.model_io import gguf_weight_types
        from compress.families.causal_lm.task import bos_note

        notes = [f"Perplexity windows and prompts: {bos_note(self.tokenizer)}."]
        if self.data_cfg.texts:
            names = ", ".join(f"`{n}`" for n in self.data_cfg.texts)
            notes.append(
                f"Texts: `ppl` is measured on data.text and `ppl:NAME` on {names}, "
                f"{self.data_cfg.evaluation_windows} windows of {self.data_cfg.window} tokens each; "
                f"{self._calibration_note()}; gates read `ppl` (data.text) only."
            )
        if self.links_source:
            notes.append(
                "The source is linked (model.link: true): the float model is never materialised, so the baseline "
                "is not evaluated and gates relative to it are not checked."
            )
        kinds = gguf_weight_types(self.model_cfg.source)
        if kinds:
            notes.append(
                f"The source GGUF stores its weights as {', '.join(kinds)}: the FP32 baseline is a dequantised "
                f"model of that precision, not an original full-precision checkpoint."
            )
        return notes

    def save_torch(self, model: torch.nn.Module, folder: Path) -> str:
        from compress.families.causal_lm.model_io import save_torch

        save_torch(model, self.tokenizer, folder)
        return "."

    def load_torch(self, artifact: Artifact) -> torch.nn.Module:
        from compress.families.causal_lm.model_io import load_torch

        return load_torch(artifact.path, trust_remote_code=self.model_cfg.trust_remote_code)

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
        from compress.families.causal_lm.export import export_decoder

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
        from compress.families.causal_lm.export import check_parity
        from compress.families.causal_lm.sessions import OrtCausalLM

        with quiet_third_party():  # transformers warns on every cached forward (FutureWarning)
            report = check_parity(
                model,
                OrtCausalLM(onnx_path, threads=threads),
                self.tokenizer,
                atol=atol,
                steps=samples,
                raise_on_failure=raise_on_failure,
            )
        return {
            "parity_max_abs_diff": max(report.prefill_max_abs, report.decode_max_abs),
            "parity_decode_steps": samples,
            "parity_greedy_tokens_match": bool(report.tokens_match),
        }

    # -- data ----------------------------------------------------------------------------------------
    @cached_property
    def _all_windows(self) -> dict[str, np.ndarray]:
        """Every text cut into windows, by name ('text' for data.text)."""
        from compress.families.causal_lm.task import read_text, tokenize_windows

        return {
            keys[-1] if keys[1] == "texts" else PRIMARY_TEXT: tokenize_windows(
                read_text(source, ".".join(keys)), self.tokenizer, window=self.data_cfg.window
            )
            for keys, source in self._sources()
        }

    @cached_property
    def _splits(self) -> TextSplits:
        """Every text's windows split (evaluation first), calibration drawn round-robin from the named texts."""
        from compress.families.causal_lm.task import mix_calibration

        d = self.data_cfg
        return mix_calibration(
            self._all_windows, d.calibration_texts, evaluation=d.evaluation_windows, calibration=d.calibration_windows
        )

    @cached_property
    def windows(self) -> dict[str, np.ndarray]:
        """The roles of the primary text's windows (the calibration ones from the mix, when there is one)."""
        d, splits = self.data_cfg, self._splits
        # training may reuse calibration text, never evaluation text
        rest = self._all_windows[PRIMARY_TEXT][d.evaluation_windows :]
        train = rest if d.train_windows is None else rest[: d.train_windows]
        if d.train_windows is not None and len(train) < d.train_windows:
            raise ValueError(f"data.train_windows = {d.train_windows}: only {len(rest)} windows after evaluation")
        return {"evaluation": splits.evaluation[PRIMARY_TEXT], "calibration": splits.calibration, "train": train}

    @property
    def text_windows(self) -> dict[str, np.ndarray]:
        """The evaluation windows of each text of `data.texts`, by name."""
        return {name: w for name, w in self._splits.evaluation.items() if name != PRIMARY_TEXT}

    @cached_property
    def prompt_ids(self) -> list[list[int]]:
        """The prompts as the tokenizer encodes them itself (with its BOS, if it adds one)."""
        from compress.families.causal_lm.task import encode_prompt

        return [encode_prompt(self.tokenizer, p) for p in self.data_cfg.prompts]

    def data_hashes(self) -> dict[str, str]:
        """Token hashes per role; evaluation's covers the prompts' ids and generation length too, so a change
        of either (or of how the tokenizer's BOS is applied) is never a stale evaluation cache hit."""
        from compress.families.causal_lm.task import token_hash
        from compress.hashing import sha256_json

        hashes = {role: token_hash(w) for role, w in self.windows.items()}
        hashes["evaluation"] = sha256_json(
            {
                "windows": hashes["evaluation"],
                "prompts": self.prompt_ids,
                "generation_tokens": self.data_cfg.generation_tokens,
                # only when asked, so a pipeline without presets / texts keeps its cached evaluations
                **({"presets": self.preset_options} if self.data_cfg.presets else {}),
                **({"texts": {n: token_hash(w) for n, w in self.text_windows.items()}} if self.data_cfg.texts else {}),
            }
        )
        return hashes

    @cached_property
    def preset_options(self) -> dict[str, dict[str, Any]]:
        """`data.presets` as GenerationOptions dumps: the prompts' length, the seed, the tokenizer's EOS."""
        from compress.families.causal_lm.presets import preset_options

        eos = self.tokenizer.eos_token_id
        common = {
            "max_new_tokens": self.data_cfg.generation_tokens,
            "seed": self.data_cfg.preset_seed,
            "stop_token_ids": (eos,) if eos is not None else (),
            "pad_token_id": self.tokenizer.pad_token_id or 0,
        }
        return {n: preset_options(n, common).model_dump(mode="json") for n in self.data_cfg.presets}

    def preset_continuations(self, session: DecoderSession) -> dict[str, Any]:
        """Each preset's continuation of each prompt (one prompt at a time, the sampler seeded per prompt) and
        the settings that differ from greedy, for the report."""
        from compress.families.causal_lm.generate import GenerationOptions, generate
        from compress.families.causal_lm.presets import preset_settings

        runs = {}
        for name, dumped in self.preset_options.items():
            opts = GenerationOptions(**dumped)
            tokens = [generate(session, [p], opts).tokens[0] for p in self.prompt_ids]
            seed = {"seed": opts.seed} if opts.do_sample else {}  # greedy and beam search draw nothing
            runs[name] = {"settings": {**preset_settings(opts), **seed}, "tokens": tokens}
        return {"prompts": list(self.data_cfg.prompts), "runs": runs}

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

    # -- evaluation, benchmarks (sessions: compress.backends.open_session, kind "decoder") ----------
    def evaluate(self, session: DecoderSession, reporter: Reporter, label: str) -> Evaluation:
        result = self._perplexity(session, reporter, f"evaluate {label} (perplexity)", self.windows["evaluation"])
        n = self.data_cfg.generation_tokens
        with quiet_third_party():  # transformers warns on every cached forward (FutureWarning)
            generated = [session.continue_greedy(list(p), n) for p in self.prompt_ids]
            outputs: dict[str, Any] = {"greedy": generated}
            if self.data_cfg.presets:
                outputs["presets"] = self.preset_continuations(session)
        metrics = {"ppl": result.perplexity, "tokens": result.tokens}
        for name, windows in self.text_windows.items():
            other = self._perplexity(session, reporter, f"evaluate {label} (perplexity on {name})", windows)
            metrics[f"ppl:{name}"], metrics[f"tokens:{name}"] = other.perplexity, other.tokens
        return Evaluation(metrics, result.predictions, outputs, samples={"window_nll": result.window_nll})

    def _perplexity(
        self, session: DecoderSession, reporter: Reporter, what: str, windows: np.ndarray
    ) -> PerplexityResult:
        from compress.families.causal_lm.task import perplexity

        with reporter.task(what, total=len(windows)) as task:
            return perplexity(
                session.logits,
                windows,
                batch_size=self.data_cfg.batch_size,
                advance=lambda n, ppl: task.advance(n, info=f"running ppl {ppl:.1f}"),
            )

    def report_view(self) -> ReportView:
        d = self.data_cfg
        card = {
            "text": d.text.model_dump(mode="json", exclude_none=True),
            **{f"text {n}": s.model_dump(mode="json", exclude_none=True) for n, s in d.texts.items()},
            "windows": len(self.windows["evaluation"]),
            "window tokens": d.window,
            **({"calibration": self._calibration_note()} if d.texts else {}),
        }
        return ReportView(
            decode=lambda ids: [self.tokenizer.decode([i]) for i in ids],
            data_card={"evaluation": card, "prompts": len(self.prompt_ids)},
        )

    def _calibration_note(self) -> str:
        from compress.families.causal_lm.task import calibration_shares

        d = self.data_cfg
        shares = calibration_shares(d.calibration_texts, d.calibration_windows)
        return (
            "calibration windows: "
            + ", ".join(f"{k} from `{n}`" for n, k in shares.items())
            + (" (round-robin)" if len(shares) > 1 else "")
        )

    def compare(self, result: Evaluation, baseline: Evaluation) -> dict[str, float]:
        from compress.families.causal_lm.task import greedy_match, top1_agreement

        match = greedy_match(result.outputs["greedy"], baseline.outputs["greedy"], self.data_cfg.generation_tokens)
        texts = {
            f"ppl_rise_pct:{name}": 100.0 * (result.metrics[key] / baseline.metrics[key] - 1.0)
            for name in self.data_cfg.texts
            if (key := f"ppl:{name}") in result.metrics and key in baseline.metrics
        }
        return {
            "ppl_rise_pct": 100.0 * (result.metrics["ppl"] / baseline.metrics["ppl"] - 1.0),
            **texts,
            "agreement": 100.0 * top1_agreement(result.predictions, baseline.predictions),
            "greedy_identical": 100.0 * match.identical,
            "greedy_first_divergence_mean": match.mean_matched_tokens,
        }

    def benchmark(self, session: DecoderSession, settings: BenchOptions, machine: dict[str, Any]) -> dict[str, Any]:
        """Prefill latency and TTFT at each prompt length, decode tokens/s at each batch size, and the
        memory-bandwidth bound of a decode step (weight bytes / measured copy bandwidth).

        An onnxruntime-genai artifact (genai_config.json beside the graph) is timed through its Generator,
        the engine a deployer runs (`engine` in the result), not through our session on the same graph."""
        from dataclasses import asdict

        from compress.bench.decoder import bench_decoder, file_bytes, onnx_weight_bytes, torch_weight_bytes
        from compress.families.causal_lm.genai_engine import GeneratorBench, is_genai_folder
        from compress.families.causal_lm.sessions import OrtCausalLM

        timed: Any = session
        if isinstance(session, OrtCausalLM):
            vocab, weights, size = (
                int(session.info["vocab_size"]),
                onnx_weight_bytes(session.path),
                file_bytes(session.path),
            )
            if is_genai_folder(session.path.parent):  # the deployable engine times the deployable file
                timed = GeneratorBench(session.path.parent, threads=settings.threads)
        else:
            model = session.model
            vocab, weights = int(model.config.vocab_size), torch_weight_bytes(model)
            size = torch_weight_bytes(model, decode_only=False)
        with quiet_third_party():  # transformers warns on every cached forward (FutureWarning)
            res = bench_decoder(
                timed,
                vocab_size=vocab,
                weight_bytes=weights,
                size_bytes=size,
                threads=settings.threads,
                prompt_lengths=settings.prompt_lengths,
                batch_sizes=settings.batch_sizes,
                decode_tokens=settings.decode_tokens,
                decode_prompt_lengths=settings.decode_prompt_lengths,
                warmup=min(settings.warmup, 3),
                bandwidth_gbs=machine["copy_bandwidth_gbs"],
                iterations=max(3, min(settings.iterations, 10)),
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
