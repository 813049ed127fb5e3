"""The `text-encoder` adapter: composes `model_io` (load, save, export) and `task` (data, metrics).

INT8 default (`quantize: {precision: int8}`): `dynamic` (W8A8, `MatMulInteger` with one activation scale per
tensor computed at run time; `activations: token` for one per token). An encoder runs every token of every
text at once, like an LLM's prefill: there W8A8 integer GEMMs are what makes INT8 faster (SmolLM2 prefill of
128 tokens in the README: dynamic 130 ms, weight-only 342 ms, FP32 373 ms), and the activation scales follow
each input without calibration data. ONNX Runtime recommends dynamic quantization for transformer encoders on
CPU; `static` also quantizes the activation-activation MatMuls of attention and the residual Adds, the usual
accuracy trap.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from compress.errors import ConfigError
from compress.families.base import Adapter, Evaluation, IOSpec, QualityMetric
from compress.families.text_encoder.options import (
    TextEncoderDataOptions,
    TextEncoderModelOptions,
    local_folder,
    parse_source,
)
from compress.registry import register_adapter

if TYPE_CHECKING:
    import torch

    from compress.artifact import Artifact
    from compress.backends import Session
    from compress.families.text_encoder.task import RetrievalSet
    from compress.progress import Reporter


@register_adapter("text-encoder")
class TextEncoderAdapter(Adapter):
    # -- what this family's models can take (see Adapter: stages and distillation ask these) ----------------
    stage_kinds: ClassVar[frozenset[str]] = frozenset({"export", "quantize"})
    distill_task: ClassVar[str | None] = None
    model_options = TextEncoderModelOptions
    data_options = TextEncoderDataOptions
    metric_names = ("cosine_pct", "recall@1", "recall@5", "mrr")
    quality = QualityMetric(
        "cosine_pct", "points", "cosine_drop", higher_is_better=True, detail="cosine {ours:.2f}% vs {theirs:.2f}%"
    )
    default_int8_method = "dynamic"
    calibration_batch_size = 1  # one text (input_ids + attention_mask) per forward
    #: GPTQ runs in one pass over all Linears (an encoder has no decoder-layer map); AWQ needs one
    int4_methods: ClassVar[frozenset[str]] = frozenset({"rtn", "gptq"})
    comparisons = (
        ("cosine_drop", "Δcosine (points)", -1),
        ("agreement", "cosine %", 1),
        ("recall@1_drop", "ΔRecall@1 (points)", -1),
        ("mrr_drop", "ΔMRR (points)", -1),
    )
    model_cfg: TextEncoderModelOptions
    data_cfg: TextEncoderDataOptions

    # -- checks before any work ----------------------------------------------------------------------
    def preflight(self) -> list[tuple[tuple[str | int, ...], str]]:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        try:
            scheme, rest = parse_source(self.model_cfg.source)
            if scheme == "python":
                from compress.sources import import_callable

                import_callable(self.model_cfg.source)
            elif (folder := local_folder(rest, self.base_dir)) is not None:
                problems += self._folder_problems(folder)
            elif not HUB_ID.fullmatch(rest):
                problems.append((("model", "source"), f"'{rest}': no such folder, and not a hub id (NAME or ORG/NAME)"))
        except ConfigError as exc:
            problems.append((("model", "source"), str(exc)))
        try:
            self.retrieval_set  # noqa: B018  (builds the set: a missing file or too few pairs is said now)
        except ConfigError as exc:
            problems.append((("data", "pairs"), str(exc)))
        return problems

    def _folder_problems(self, folder: Path) -> list[tuple[tuple[str | int, ...], str]]:
        from compress.sources import remote_code_problem

        if not (folder / "config.json").is_file():
            return [(("model", "source"), f"{folder}: no config.json (expected a save_pretrained folder)")]
        problems = []
        if problem := remote_code_problem(f"hf:{folder}", self.model_cfg.trust_remote_code):
            problems.append((("model", "trust_remote_code"), problem))
        if problem := self._length_problem(self._model_config):
            problems.append((("data", "max_length"), problem))
        return problems

    def _length_problem(self, config: dict[str, Any]) -> str | None:
        """Texts are cut at data.max_length tokens; the model must have that many positions."""
        positions = config.get("max_position_embeddings")
        if isinstance(positions, int) and self.data_cfg.max_length > positions:
            return (
                f"{self.data_cfg.max_length} tokens, but the model has {positions} positions; use at most {positions}"
            )
        return None

    # -- data ----------------------------------------------------------------------------------------
    @cached_property
    def retrieval_set(self) -> RetrievalSet:
        from compress.families.text_encoder.task import jsonl_set, pydoc_set
        from compress.sources import resolve_path

        d = self.data_cfg
        if d.pairs.kind == "pydoc":
            return pydoc_set(calibration=d.calibration_queries, evaluation=d.evaluation_queries, seed=d.seed)
        path = resolve_path(str(d.pairs.path), self.base_dir)
        if not path.is_file():
            raise ConfigError(f"data.pairs.path = {d.pairs.path}: no such file ({path})")
        return jsonl_set(path, calibration=d.calibration_queries, evaluation=d.evaluation_queries)

    def data_hashes(self) -> dict[str, str]:
        s, length = self.retrieval_set, self.data_cfg.max_length
        return {role: s.sha256(role, length) for role in ("calibration", "evaluation")}

    def calibration_inputs(self, samples: int | None = None, batch_size: int = 1) -> Iterator[dict[str, np.ndarray]]:
        from compress.families.text_encoder.task import batches

        texts = self.retrieval_set.calibration[:samples]
        names = self.input_names
        for inputs in batches(self.tokenizer, texts, self.data_cfg.max_length, batch_size):
            yield {n: inputs[n] for n in names}

    def parity_inputs(self, samples: int) -> dict[str, np.ndarray]:
        return next(self.calibration_inputs(samples, batch_size=samples))

    def bench_inputs(self, batch_size: int) -> dict[str, np.ndarray]:
        """`batch_size` texts of `data.max_length` random tokens, unpadded: the worst case of the evaluation.

        An encoder's latency depends on the shape only; random ids keep torch and transformers out of a
        benchmark worker of an ONNX artifact (its peak RSS is the artifact's own). Sessions take the inputs
        their model has.
        """
        shape = (batch_size, self.data_cfg.max_length)
        ids = np.random.default_rng(0).integers(0, int(self._model_config["vocab_size"]), size=shape, dtype=np.int64)
        return {
            "input_ids": ids,
            "attention_mask": np.ones(shape, np.int64),
            "token_type_ids": np.zeros(shape, np.int64),
        }

    # -- models --------------------------------------------------------------------------------------
    @cached_property
    def _loaded(self) -> tuple[Any, Any]:
        from compress.families.text_encoder.model_io import load

        m = self.model_cfg
        self.reporter.log(f"  loading {m.source}")
        model, tokenizer = load(
            m.source,
            base_dir=self.base_dir,
            cache_dir=self.cache_dir,
            normalize=m.normalize,
            trust_remote_code=m.trust_remote_code,
        )
        if problem := self._length_problem(model.backbone.config.to_dict()):
            raise ConfigError(f"data.max_length = {problem}")
        return model, tokenizer

    @cached_property
    def tokenizer(self) -> Any:
        return self._loaded[1]

    def _folder(self) -> Path | None:
        """The local folder of an `hf:` source (None for a hub id or a `python:` factory)."""
        scheme, rest = parse_source(self.model_cfg.source)
        return local_folder(rest, self.base_dir) if scheme == "hf" else None

    @cached_property
    def _model_config(self) -> dict[str, Any]:
        """The backbone's config: a local folder's config.json as it is (no model, no torch), else the loaded one."""
        folder = self._folder()
        if folder is not None:
            try:
                return json.loads((folder / "config.json").read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"model.source = {self.model_cfg.source}: {folder}/config.json: {exc}") from None
        return self._loaded[0].backbone.config.to_dict()

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._loaded[0].input_names

    def source_fingerprint(self) -> dict[str, Any]:
        """The whole content of a local folder's files or a factory's module (see llm.sources), and `normalize`."""
        from compress.sources import source_fingerprint

        m = self.model_cfg
        folder = self._folder()
        spec = f"hf:{folder}" if folder is not None else m.source
        fingerprint = source_fingerprint(spec, cache_dir=self.cache_dir)
        return {"source": m.source, "fingerprint": fingerprint, "normalize": m.normalize}

    def load_source(self) -> tuple[torch.nn.Module, bool]:
        return self._loaded[0], True

    def save_torch(self, model: torch.nn.Module, folder: Path) -> str:
        from compress.families.text_encoder.model_io import save

        save(model, self.tokenizer, folder)
        return "."

    def load_torch(self, artifact: Artifact) -> torch.nn.Module:
        from compress.families.text_encoder.model_io import load_saved

        return load_saved(artifact.path, trust_remote_code=self.model_cfg.trust_remote_code)

    def io_spec(self) -> IOSpec:
        from compress.families.text_encoder.model_io import OUTPUT

        names = self.input_names
        return IOSpec(
            inputs={n: ("batch", "sequence") for n in names},
            outputs={OUTPUT: ("batch", self._loaded[0].hidden_size)},
            dtypes=dict.fromkeys(names, "int64"),
        )

    def export_onnx(self, model: torch.nn.Module, path: Path, *, opset: int, dynamo: bool) -> None:
        from compress.families.text_encoder.model_io import export

        export(model, self.parity_inputs(2), path, opset=opset, dynamo=dynamo)

    def open_session(self, artifact: Artifact, *, threads: int, onnx_provider: str = "cpu") -> Session:
        """Torch artifacts run with the inputs their own model takes (no source model is loaded for it)."""
        if artifact.format != "torch":
            return super().open_session(artifact, threads=threads, onnx_provider=onnx_provider)
        from compress.backends.torch_backend import TorchSession

        model = self.load_torch(artifact)
        return TorchSession(model, list(model.input_names), threads=threads)

    # -- evaluation ----------------------------------------------------------------------------------
    def _embed(self, run: Any, texts: tuple[str, ...], advance: Any = None) -> np.ndarray:
        from compress.families.text_encoder.task import embed

        d = self.data_cfg
        return embed(run, self.tokenizer, texts, max_length=d.max_length, batch_size=d.batch_size, advance=advance)

    @cached_property
    def _reference(self) -> np.ndarray:
        """Embeddings of the evaluation texts by the FP32 source model in torch: what `cosine_pct` compares with."""
        import torch

        from compress.backends.torch_backend import TorchSession

        model = self._loaded[0]
        session = TorchSession(model, list(model.input_names), threads=torch.get_num_threads())
        return self._embed(session.run, self._texts)

    @property
    def _texts(self) -> tuple[str, ...]:
        return self.retrieval_set.queries + self.retrieval_set.corpus

    def evaluate(self, session: Session, reporter: Reporter, label: str) -> Evaluation:
        from compress.families.text_encoder.task import cosine_pct, retrieval_metrics

        s = self.retrieval_set
        with reporter.task(f"evaluate {label} (embeddings)", total=len(self._texts)) as task:
            emb = self._embed(session.run, self._texts, advance=task.advance)
        metrics = {
            "cosine_pct": cosine_pct(emb, self._reference),
            **retrieval_metrics(emb[: len(s.queries)], emb[len(s.queries) :], s.positives),
            "queries": len(s.queries),
            "documents": len(s.corpus),
        }
        return Evaluation(metrics, emb)  # predictions: (queries + documents, H) embeddings

    def compare(self, result: Evaluation, baseline: Evaluation) -> dict[str, float]:
        from compress.families.text_encoder.task import cosine_pct

        ours, theirs = result.metrics, baseline.metrics
        return {
            "cosine_drop": theirs["cosine_pct"] - ours["cosine_pct"],
            "agreement": cosine_pct(result.predictions, baseline.predictions),
            "recall@1_drop": theirs["recall@1"] - ours["recall@1"],
            "mrr_drop": theirs["mrr"] - ours["mrr"],
        }


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
