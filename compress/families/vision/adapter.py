"""The `vision` adapter: composes `model_io` (build, weights, save, export) and `task` (data, metrics).

Image classifiers and backbones; the sources it builds are listed in `compress.families.vision.model_io`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from compress.data.transforms import Preprocess
from compress.errors import ConfigError
from compress.families.base import Adapter, Evaluation, IOSpec, ReportView
from compress.families.vision import model_io, task
from compress.families.vision.models import BUILTINS
from compress.families.vision.options import SOURCE_SCHEMES, VisionDataOptions, VisionModelOptions
from compress.hashing import file_fingerprint
from compress.paths import PRUNE_LAYERS_FILE
from compress.prune.options import VISION_PRUNING
from compress.registry import register_adapter
from compress.sources import import_callable, module_file, resolve_path

if TYPE_CHECKING:
    import torch

    from compress.artifact import Artifact
    from compress.backends import Session
    from compress.data.datasets import LabelledImages
    from compress.progress import Reporter
    from compress.prune.options import PruneOptions
    from compress.prune.vision import PruneReport


@register_adapter("vision")
class VisionAdapter(Adapter):
    # -- what this family's models can take (see Adapter: stages and distillation ask these) ----------------
    stage_kinds: ClassVar[frozenset[str]] = frozenset({"finetune", "prune", "distill", "export", "quantize", "engine"})
    distill_task: ClassVar[str | None] = "classification"
    model_options = VisionModelOptions
    data_options = VisionDataOptions
    metric_names = task.METRIC_NAMES
    quality = task.QUALITY
    comparisons = task.COMPARISONS
    prune_support = VISION_PRUNING
    labelled_calibration = True
    model_cfg: VisionModelOptions
    data_cfg: VisionDataOptions

    # -- checks before any work ----------------------------------------------------------------------
    def preflight(self) -> list[tuple[tuple[str | int, ...], str]]:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        scheme, _, name = self.model_cfg.source.partition(":")
        if scheme not in SOURCE_SCHEMES:
            problems.append((("model", "source"), f"unknown scheme '{scheme}'; allowed: {', '.join(SOURCE_SCHEMES)}"))
        elif scheme == "builtin" and name not in BUILTINS:
            problems.append((("model", "source"), f"unknown built-in model '{name}'; allowed: {', '.join(BUILTINS)}"))
        elif scheme == "hf" and (problem := self._hf_problem(name)):
            problems.append((("model", "source"), problem))
        elif scheme == "python":
            try:
                import_callable(self.model_cfg.source)  # the user's own module, named in their pipeline
            except ConfigError as exc:
                problems.append((("model", "source"), str(exc)))
        if self.model_cfg.weights:
            try:
                path = resolve_path(self.model_cfg.weights, self.base_dir)
                if not path.is_file():
                    problems.append((("model", "weights"), f"'{self.model_cfg.weights}': no such file ({path})"))
                elif problem := model_io.weights_problem(path):
                    problems.append((("model", "weights"), problem))
            except ConfigError as exc:
                problems.append((("model", "weights"), str(exc)))
        definition = resolve_path(self.data_cfg.dataset, self.base_dir)
        if not definition.is_file():
            problems.append((("data", "dataset"), f"'{self.data_cfg.dataset}': no such dataset definition"))
        else:
            problems += task.dataset_problems(self.data_cfg, definition)
        return problems

    def _hf_problem(self, name: str) -> str | None:
        """A local folder must hold a config and name no code to run; anything else must look like a hub id."""
        from compress.sources import HUB_ID, remote_code_problem

        folder = resolve_path(name, self.base_dir)
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                return f"'{name}': folder {folder} has no config.json (save the model with save_pretrained)"
            return remote_code_problem(f"hf:{folder}", trust_remote_code=False)
        if not HUB_ID.fullmatch(name):
            return f"'{name}': no such folder ({folder}) and not a hub id of the form NAME or ORG/NAME"
        return None

    # -- data ----------------------------------------------------------------------------------------
    @cached_property
    def preprocess(self) -> Preprocess:
        m = self.model_cfg
        return Preprocess(m.input_size, m.channels, m.mean, m.std)

    @cached_property
    def subsets(self) -> dict[str, LabelledImages]:
        return task.load_subsets(self.data_cfg, self.base_dir, self.model_cfg.input_size)

    def data_hashes(self) -> dict[str, str]:
        return {role: subset.sha256 for role, subset in self.subsets.items()}

    def subset(self, role: str) -> LabelledImages:
        """A role's subset; a role the pipeline does not set is its mistake (exit 2), found when a stage asks."""
        if role not in self.subsets:
            raise ConfigError(f"data.{role} is not set, but a stage needs it; add data.{role}: {{split: ...}}")
        return self.subsets[role]

    def batches(
        self, role: str, batch_size: int, *, seed: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(inputs float32 (B, C, S, S), labels) over a role's subset; shuffled when `seed` is given."""
        return task.batches(self.subset(role), self.preprocess, batch_size, seed=seed)

    def train_batches(self, batch_size: int, *, seed: int = 0) -> Sequence[tuple[torch.Tensor, torch.Tensor]]:
        """data.train as map-style batches (inputs float32 (B, C, S, S), labels int64), preprocessed on access."""
        return task.train_batches(self.subset("train"), self.preprocess, batch_size, seed=seed)

    def kl_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        return [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in self.batches("calibration", 64)]

    def calibration_inputs(self, samples: int | None = None, batch_size: int = 1) -> Iterator[dict[str, np.ndarray]]:
        data = self.subset("calibration")
        n = len(data) if samples is None else min(samples, len(data))
        for start in range(0, n, batch_size):
            yield {model_io.INPUT: self.preprocess(data.images[start : min(start + batch_size, n)])}

    def parity_inputs(self, samples: int) -> dict[str, np.ndarray]:
        data = self.subset("calibration")
        return {model_io.INPUT: self.preprocess(data.images[:samples])}

    def num_classes(self) -> int:
        return self.model_cfg.num_classes or len(self.subset("evaluation").classes)

    # -- models --------------------------------------------------------------------------------------
    def source_fingerprint(self) -> dict[str, Any]:
        """The whole content of the weights file and of a `python:` factory's module (digests cached by stat)."""
        m = self.model_cfg
        weights = module = None
        if m.weights:
            weights = file_fingerprint(resolve_path(m.weights, self.base_dir), self.cache_dir)
        scheme, _, name = m.source.partition(":")
        if scheme == "python" and (path := module_file(m.source)) is not None:
            module = file_fingerprint(path, self.cache_dir)
        elif scheme == "builtin" and name in BUILTINS:
            module = file_fingerprint(Path(BUILTINS[name].file), self.cache_dir)
        elif scheme == "hf":
            from compress.sources import source_fingerprint

            module = source_fingerprint(f"hf:{model_io.hf_target(name, self.base_dir)}", self.cache_dir)
        key = {"source": m.source, "weights": weights, "module": module, "num_classes": m.num_classes}
        if scheme == "builtin" and name in BUILTINS and BUILTINS[name].sized:
            key["input_size"] = m.input_size  # a ViT's position embeddings follow it
        return key

    def load_source(self) -> tuple[torch.nn.Module, bool]:
        """The source model with its weights and task head.

        A weights file's contents (keys, shapes) can only be checked by loading it, so this is the last
        check of `model.weights` and `model.source`: model_io's ValueError becomes the ConfigError of a
        pipeline mistake (exit 2), as preflight's checks of the same keys are.
        """
        try:
            model = model_io.build(self.model_cfg, self.base_dir)
            if self.model_cfg.weights:
                path = resolve_path(self.model_cfg.weights, self.base_dir)
                model_io.load_weights(model, model_io.read_state(path), self.model_cfg)
            task_ready = True
            if self.model_cfg.num_classes is not None:
                task_ready = not model_io.replace_head(model, self.model_cfg.num_classes)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return model.eval(), task_ready

    def save_torch(self, model: torch.nn.Module, folder: Path) -> str:
        return model_io.save(model, folder)

    def load_torch(self, artifact: Artifact) -> torch.nn.Module:
        return model_io.load_saved(artifact.path, self._unpruned)

    def _unpruned(self) -> torch.nn.Module:
        """The model the pipeline's source builds, with the task head: what a stored artifact's widths adjust."""
        model = model_io.build(self.model_cfg, self.base_dir)
        if self.model_cfg.num_classes is not None:
            model_io.replace_head(model, self.model_cfg.num_classes)
        return model

    def prune(
        self, model: torch.nn.Module, options: PruneOptions, *, samples: int, batch_size: int, outdir: Path
    ) -> dict[str, Any]:
        """Channels (and a ViT's heads and MLP widths) through torch-pruning (`compress.prune.prune_vision`);
        per-layer widths in `_prune_layers.json`."""
        import torch

        from compress.prune import prune_vision

        example = torch.from_numpy(self.parity_inputs(1)[model_io.INPUT])
        calib = None
        if options.importance == "taylor":
            calib = []
            for x, y in self.batches("calibration", batch_size):
                calib.append((torch.from_numpy(x), torch.from_numpy(y)))
                if sum(len(b[1]) for b in calib) >= samples:
                    break
        target = options.target
        what = f"{target.macs:.0%} of MACs" if target.macs is not None else f"{target.channels:.0%} of channels"
        steps = options.steps if target.macs is not None else 1
        with self.reporter.task(f"prune {what} ({options.importance}, {options.scope})", total=steps) as bar:

            def progress(step: int, total: int, reduction: float) -> None:
                bar.advance(1, info=f"step {step}/{total}: MACs -{reduction:.1%}")

            report = prune_vision(model, example, options, calib_batches=calib, progress=progress)

        layers = [{"name": lc.name, "before": lc.before, "after": lc.after} for lc in report.layers]
        (outdir / PRUNE_LAYERS_FILE).write_text(json.dumps(layers, indent=1) + "\n")
        self.reporter.log(
            f"  MACs {report.macs_before / 1e6:.1f}M -> {report.macs_after / 1e6:.1f}M "
            f"(-{report.macs_reduction:.1%}), params {report.params_before / 1e6:.2f}M -> "
            f"{report.params_after / 1e6:.2f}M in {report.steps} step(s); per-layer widths in {PRUNE_LAYERS_FILE}"
        )
        return {"importance": options.importance, **_prune_info(report)}

    def io_spec(self) -> IOSpec:
        return model_io.io_spec(self.model_cfg, self.num_classes())

    def export_onnx(self, model: torch.nn.Module, path: Path, *, opset: int, dynamo: bool) -> None:
        example = self.parity_inputs(2)[model_io.INPUT]
        model_io.export(model, example, path, self.io_spec(), opset=opset, dynamo=dynamo)

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, session: Session, reporter: Reporter, label: str) -> Evaluation:
        data = self.subset("evaluation")
        return task.evaluate(session, data, self.preprocess, self.data_cfg.batch_size, reporter, label)

    def evaluate_calibration(self, session: Session, start: int, stop: int, reporter: Reporter) -> Evaluation:
        import dataclasses

        data = self.subset("calibration")
        if stop > len(data):
            raise IndexError(f"data.calibration holds {len(data)} samples")
        part = slice(start, stop)
        images = dataclasses.replace(
            data, images=data.images[part], labels=data.labels[part], indices=data.indices[part]
        )
        return task.evaluate(session, images, self.preprocess, self.data_cfg.batch_size, reporter, "calibration slice")

    def report_view(self) -> ReportView:
        from compress.data.datasets import dataset_card

        data = self.subset("evaluation")
        file = resolve_path(self.data_cfg.dataset, self.base_dir)
        return ReportView(
            class_names=data.classes,
            examples=lambda idx: data.images[idx],
            data_card=dataset_card(file, self.subsets),
        )

    def compare(self, result: Evaluation, baseline: Evaluation) -> dict[str, float]:
        return task.compare(result, baseline)

    def bench_inputs(self, batch_size: int) -> dict[str, np.ndarray]:
        m = self.model_cfg
        rng = np.random.default_rng(0)
        shape = (batch_size, m.channels, m.input_size, m.input_size)
        return {model_io.INPUT: rng.standard_normal(shape, dtype=np.float32)}


def _prune_info(report: PruneReport) -> dict[str, Any]:
    """The numbers of a prune report the artifact's info keeps."""
    changed = [lc for lc in report.layers if lc.after != lc.before]
    return {
        "params_before": report.params_before,
        "params_after": report.params_after,
        "params_reduction": round(report.params_reduction, 4),
        "macs_before": report.macs_before,
        "macs_after": report.macs_after,
        "macs_reduction": round(report.macs_reduction, 4),
        "prune_steps": report.steps,
        "layers_pruned": len(changed),
        "layers_total": len(report.layers),
        "min_layer_kept": round(min((lc.after / lc.before for lc in changed), default=1.0), 3),
    }
