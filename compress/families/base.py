"""The adapter interface: what stages, the evaluator and the benchmark ask of a model family."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel

from compress.errors import StageError
from compress.quant.vocab import INT4_ALGORITHMS, INT8_METHODS, TARGETS, Int8Method

if TYPE_CHECKING:
    import torch

    from compress.artifact import Artifact
    from compress.backends import Session
    from compress.config import BenchOptions
    from compress.progress import Reporter
    from compress.prune.options import PruneOptions, PruneSupport
    from compress.stages.base import StageOutput


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one artifact on the evaluation set, plus what is needed to compare with the baseline."""

    metrics: dict[str, float]
    predictions: np.ndarray = field(repr=False)  # per-sample (vision) or per-token (LLM) top-1 ids
    outputs: dict[str, Any] = field(default_factory=dict, repr=False)  # JSON-able extras (e.g. generated ids)
    #: per-sample arrays the report draws (vision: `labels`, `confidence` = softmax max; causal-lm:
    #: `window_nll` = mean NLL of each evaluation window); cached beside the predictions
    samples: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ReportView:
    """What the report needs of a family beyond the records: names, the evaluation images, a detokenizer and
    the data card. Everything is optional; a picture whose input is missing is left out."""

    class_names: tuple[str, ...] = ()
    examples: Callable[[np.ndarray], np.ndarray] | None = None  # evaluation images by index, uint8 (N, H, W[, C])
    decode: Callable[[Sequence[int]], list[str]] | None = None  # token ids -> one string per token
    data_card: Mapping[str, Any] = field(default_factory=dict)  # dataset, splits, sizes, licence, source


@dataclass(frozen=True)
class QualityMetric:
    """The family's primary metric, as the generic quality gate (`gates.quality_drop_max`) and
    `recovery_min` use it: `drop_key` is the key of `compare()` that says how much worse an artifact is than
    the baseline, in `unit` (positive = worse). `alias` is the family's older gate name for the same bound."""

    name: str  # key of Evaluation.metrics
    unit: str  # unit of compare()[drop_key]
    drop_key: str
    higher_is_better: bool
    alias: str | None = None
    detail: str = "{name} {ours:.3f} vs {theirs:.3f}"  # what a gate shows: this artifact vs the baseline


@dataclass(frozen=True)
class IOSpec:
    inputs: dict[str, tuple[str | int, ...]]  # name -> shape, symbolic dims as names
    outputs: dict[str, tuple[str | int, ...]]
    dtypes: dict[str, str]  # input name -> numpy dtype


def links_source(model_cfg: BaseModel) -> bool:
    """True when a family's `model:` options set `link: true` (`Adapter.link_source`)."""
    return bool(getattr(model_cfg, "link", False))


class Adapter(ABC):
    """One model family. Construct with the pipeline's validated `model` and `data` options."""

    family: ClassVar[str]
    # -- what the family's models can take: config, stages and distillation ask these, never a family name --
    #: stage kinds a pipeline of this family may use; config refuses the others before any work
    stage_kinds: ClassVar[frozenset[str]] = frozenset({"export", "quantize"})
    #: name of the task in `compress.distill.tasks.TASKS` the `distill` stage trains with (None: no distill)
    distill_task: ClassVar[str | None] = None
    model_options: ClassVar[type[BaseModel]]
    data_options: ClassVar[type[BaseModel]]
    #: metric names, in report order; the first is the one plots use
    metric_names: ClassVar[tuple[str, ...]]
    #: the primary metric, its direction and its drop in `compare()`: what quality gates bound
    quality: ClassVar[QualityMetric]
    #: True if `benchmark()` measures decode tokens/s (the `llm` block that `decode_speedup_min` bounds)
    measures_decode: ClassVar[bool] = False
    #: INT8 method `quantize: {precision: int8, method: auto}` picks (see stages/quantize/int8.py)
    default_int8_method: ClassVar[Int8Method] = "static"
    #: INT8 methods this family's models can take (smoothquant folds into a decoder's norms: causal-lm only)
    int8_methods: ClassVar[frozenset[str]] = frozenset(INT8_METHODS) - {"smoothquant"}
    #: INT4 algorithms (`quantize: {precision: int4, method: ...}`) this family's models can take
    #: (autoround: Hugging Face decoders with a tokenizer, so only the causal-lm family declares it)
    int4_methods: ClassVar[frozenset[str]] = frozenset(INT4_ALGORITHMS) - {"autoround"}
    #: INT4 targets this family's models can take (a fused-decoder target needs a decoder LLM)
    int4_targets: ClassVar[frozenset[str]] = frozenset(TARGETS) - {"onnxruntime-genai"}
    #: True if `evaluate_calibration()` measures the primary metric on calibration samples (accuracy_budget)
    labelled_calibration: ClassVar[bool] = False
    #: inputs per forward pass when INT4 GPTQ / AWQ calibrate on this family's models
    calibration_batch_size: ClassVar[int] = 8
    #: what `compare()` returns, for the report: (key, label, sign applied for display)
    comparisons: ClassVar[tuple[tuple[str, str, int], ...]]
    #: the session protocol of `compress.backends` this family's models run through: "tensors" (`run`) or a
    #: kind a family registers (`register_session`), e.g. "decoder" (`logits`, prefill/decode, greedy)
    session_kind: ClassVar[str] = "tensors"
    #: what `prune` (the method and the stage) reads of PruneOptions; None: the family cannot be pruned
    prune_support: ClassVar[PruneSupport | None] = None

    def __init__(self, model: BaseModel, data: BaseModel, *, base_dir: Path, cache_dir: Path, reporter: Reporter):
        self.model_cfg, self.data_cfg = model, data
        self.base_dir, self.cache_dir, self.reporter = base_dir, cache_dir, reporter

    # -- checked before any work ------------------------------------------------------------------------
    def preflight(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Problems found without loading anything heavy: [(key path, message)]."""
        return []

    # -- data ----------------------------------------------------------------------------------------
    @abstractmethod
    def data_hashes(self) -> dict[str, str]:
        """sha256 of every data role (train, calibration, evaluation); loads the data."""

    @abstractmethod
    def calibration_inputs(self, samples: int | None = None, batch_size: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Model inputs (by input name) drawn from the calibration set."""

    # -- models --------------------------------------------------------------------------------------
    @abstractmethod
    def source_fingerprint(self) -> dict[str, Any]:
        """What identifies the source model (for the cache key), without loading it."""

    @abstractmethod
    def load_source(self) -> tuple[torch.nn.Module, bool]:
        """(model, task_ready): task_ready is False when a new head still has to be trained."""

    @property
    def links_source(self) -> bool:
        """True when the pipeline sets `model.link: true`: the source stage calls `link_source`, not `load_source`."""
        return links_source(self.model_cfg)

    def link_source(self, folder: Path) -> StageOutput:
        """Write into `folder` a source artifact that names the source's weight files instead of holding the
        model (config and tokenizer only); its `unmeasured` says why the float model is not evaluated."""
        raise StageError(f"the {self.family} family cannot link its source (model.link); remove model.link")

    def weights_folder(self, artifact: Artifact) -> Path:
        """The folder holding `artifact`'s weight files: its own, or the linked folder once verified."""
        return artifact.path

    @abstractmethod
    def save_torch(self, model: torch.nn.Module, folder: Path) -> str:
        """Save a torch model into `folder`; return the main file's name."""

    @abstractmethod
    def load_torch(self, artifact: Artifact) -> torch.nn.Module:
        """Load a torch artifact for inference (eval mode)."""

    @abstractmethod
    def io_spec(self) -> IOSpec:
        """Input / output names and shapes, symbolic dims by name (export, engines, benchmarks)."""

    @abstractmethod
    def export_onnx(self, model: torch.nn.Module, path: Path, *, opset: int, dynamo: bool) -> None:
        """Write `model` as ONNX to `path` with the dynamic axes of `io_spec`."""

    @abstractmethod
    def parity_inputs(self, samples: int) -> dict[str, np.ndarray]:
        """Real inputs for the export parity check."""

    # -- evaluation and benchmarks -------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, session: Session, reporter: Reporter, label: str) -> Evaluation:
        """Run the evaluation set through `session`."""

    def evaluate_calibration(self, session: Session, start: int, stop: int, reporter: Reporter) -> Evaluation:
        """The primary metric on calibration samples [start, stop): the slice `accuracy_budget` judges candidates
        on, held apart from the samples the ranges came from (never the evaluation set). The Evaluation's
        `samples["labels"]` are the slice's labels (the paired standard error needs them); IndexError if the
        calibration data holds fewer than `stop` samples."""
        raise NotImplementedError(f"family {self.family} has no labelled calibration slice; remove accuracy_budget")

    @abstractmethod
    def compare(self, result: Evaluation, baseline: Evaluation) -> dict[str, float]:
        """Metrics relative to the baseline (drops, agreement)."""

    @abstractmethod
    def bench_inputs(self, batch_size: int) -> dict[str, np.ndarray]:
        """Inputs of the given batch size for latency measurement."""

    # -- overridable defaults --------------------------------------------------------------------------
    def train_batches(self, batch_size: int, *, seed: int = 0) -> Sequence[Any]:
        """data.train as map-style batches in the form `compress.distill` takes for this family; batch `i` is
        the same on every access (a resumable loop indexes batches by step)."""
        raise StageError(f"the {self.family} adapter cannot give training batches")

    def kl_batches(self) -> list[Any]:
        """Calibration batches (the `compress.distill` form) on which a distill stage reports the KL."""
        raise StageError(f"the {self.family} adapter cannot give held-out distillation batches")

    def prune(
        self, model: torch.nn.Module, options: PruneOptions, *, samples: int, batch_size: int, outdir: Path
    ) -> dict[str, Any]:
        """Structured pruning of a model of this family, in place; return the artifact's `info`.

        `samples` / `batch_size`: calibration data for importances that read it. Side files (names starting
        with "_") may be written to `outdir`.
        """
        raise StageError(f"the {self.family} family cannot be pruned")

    def report_view(self) -> ReportView:
        """Names, images, a detokenizer and the data card for report.html (default: none of them)."""
        return ReportView()

    def notes(self) -> list[str]:
        """Facts about the source that a reader of the numbers must know; shown at the top of the report."""
        return []

    def open_session(self, artifact: Artifact, *, threads: int, onnx_provider: str = "cpu") -> Any:
        """A session of `session_kind` running `artifact` on the backend of its format (torch eager, ONNX
        Runtime on `onnx_provider`, TensorRT for engines), built by `compress.backends.open_session`."""
        from compress.backends import open_session

        return open_session(artifact, self, threads=threads, onnx_provider=onnx_provider)

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
        """Compare ONNX Runtime with torch on real inputs; raise StageError beyond atol + rtol·|torch|
        (only report with `raise_on_failure=False`)."""
        from compress.backends.onnxruntime_backend import OrtSession
        from compress.backends.torch_backend import TorchSession

        inputs = self.parity_inputs(samples)
        ref = TorchSession(model, list(self.io_spec().inputs), threads=threads).run(inputs)
        got = OrtSession(onnx_path, threads=threads).run(inputs)
        worst = 0.0
        for r, g in zip(ref, got, strict=True):
            diff = np.abs(g - r)
            worst = max(worst, float(diff.max()))
            if raise_on_failure and (diff > atol + rtol * np.abs(r)).any():
                raise StageError(
                    f"export parity failed: max |onnx - torch| = {float(diff.max()):.3g} > atol {atol} + "
                    f"rtol {rtol}·|torch| on {samples} real inputs"
                )
        return {"parity_max_abs_diff": worst, "parity_samples": samples}

    def benchmark(self, session: Session, settings: BenchOptions, machine: dict[str, Any]) -> dict[str, Any]:
        """Latency and throughput at each batch size (random inputs of the right shape)."""
        from compress.bench.harness import measure

        latency = []
        for batch in settings.batch_sizes:
            inputs = self.bench_inputs(batch)
            lat = measure(
                lambda inputs=inputs: session.run(inputs),
                batch_size=batch,
                warmup=settings.warmup,
                iterations=settings.iterations,
            )
            latency.append(lat.to_json())
        return {"latency": latency}
