"""Model I/O of the vision family: build from a source, load weights, replace the head, save, load, export.

Sources (`model.source`):
- `builtin:NAME` — our own definitions with torchvision's module names, no torchvision needed
  (`compress.families.vision.models.BUILTINS`: mobilenet_v2, resnet18/50, vit_b_16/s_16/ti_16,
  efficientnet_b0, convnext_tiny);
- `hf:FOLDER_OR_ID` — a Hugging Face image classifier (`AutoModelForImageClassification`; a local folder
  loads offline, a hub id where a hub is reachable), exported as `input` -> `logits`;
- `python:module:function` — any function returning an `nn.Module` (called with no arguments);
- `torchvision:NAME`, `timm:NAME` — when those packages are installed (`pip install 'compress[vision]'`).

`weights` loads a state dict before the head is replaced for `num_classes` task classes; for a built-in,
torchvision- and timm-format dicts both load (the format is told by the keys). Torch artifacts are
`model.safetensors` + `architecture.json` (`compress.prune.serialize`): nothing that runs code on load.
Bad files raise ValueError naming the file and what was expected.
"""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.errors import MissingDependencyError
from compress.families.base import IOSpec
from compress.families.vision.models import BUILTINS
from compress.families.vision.options import SOURCE_SCHEMES, VisionModelOptions
from compress.sources import import_callable, resolve_path

if TYPE_CHECKING:
    import numpy as np
    import torch

INPUT, OUTPUT = "input", "logits"


def build(m: VisionModelOptions, base_dir: Path) -> torch.nn.Module:
    """The model `m.source` names, with its own initialisation (weights and head are applied by the caller)."""
    import torch

    source = m.source
    scheme, _, name = source.partition(":")
    if scheme == "builtin":
        if name not in BUILTINS:
            raise ValueError(f"model.source = {source}: unknown built-in; allowed: {', '.join(BUILTINS)}")
        return BUILTINS[name].build(m.input_size)
    if scheme == "hf":
        from compress.families.vision.hf import load_image_classifier

        return load_image_classifier(hf_target(name, base_dir), source)
    if scheme == "python":
        model = import_callable(source)()
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model.source = {source}: returned {type(model).__name__}, expected a torch.nn.Module")
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
    raise ValueError(f"model.source = {source}: unknown scheme '{scheme}'; allowed: {', '.join(SOURCE_SCHEMES)}")


def hf_target(name: str, base_dir: Path) -> str:
    """A local folder (resolved like every path of a pipeline) or, when there is none, the hub id itself."""
    folder = resolve_path(name, base_dir)
    return str(folder) if folder.is_dir() else name


def weights_problem(path: Path) -> str | None:
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


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a torch.save file (tensors and containers only) or a safetensors file."""
    import torch

    if path.suffix == ".safetensors":
        from compress.tensorfile import read_tensors

        try:
            return read_tensors(path)[0]
        except Exception as exc:  # safetensors' own errors: a truncated or foreign file
            raise ValueError(f"{path}: not a valid safetensors file ({exc})") from None
    # The user's own state dict (often a third-party .pth): the safe loader refuses anything but
    # tensors and containers, so even this input cannot run code; run-folder files are never pickles.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as exc:
        size = path.stat().st_size
        raise ValueError(f"{path}: not a valid PyTorch weights file ({size} bytes read; {exc})") from None
    for wrapper in ("state_dict", "model"):  # training checkpoints (timm, DeiT) nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], m: VisionModelOptions) -> None:
    """Load `state` with every key matched; a built-in's timm-format dict (told by its keys) is renamed first."""
    formats = {"torchvision": state}
    scheme, _, name = m.source.partition(":")
    if scheme == "builtin":
        if (rename := BUILTINS[name].from_torchvision) is not None:
            formats["torchvision"] = rename(state)
        if (rename := BUILTINS[name].from_timm) is not None:
            formats["timm"] = rename(state)
    expected = set(model.state_dict())
    fits = {fmt: (sorted(expected - set(keys)), sorted(set(keys) - expected)) for fmt, keys in formats.items()}
    fmt = min(fits, key=lambda f: len(fits[f][0]) + len(fits[f][1]))  # the closest format names the mismatch
    missing, unexpected = fits[fmt]
    if missing or unexpected:
        tried = " and ".join(f"{f} ({len(a) + len(b)} keys off)" for f, (a, b) in fits.items())
        raise ValueError(
            f"model.weights = {m.weights}: keys do not match the model {m.source}; tried {tried}; "
            f"as {fmt}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    try:
        model.load_state_dict(formats[fmt], strict=True)
    except RuntimeError as exc:  # every key is there, a shape is not
        raise ValueError(f"model.weights = {m.weights}: {fmt}-format tensors do not fit {m.source}: {exc}") from None


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
        raise ValueError(
            f"model.num_classes = {num_classes}, but the model has no nn.Linear head to replace; "
            "omit num_classes or give a model with a Linear classifier"
        )
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


def save(model: torch.nn.Module, folder: Path) -> str:
    """safetensors + the widths pruning changed (`compress.prune.serialize`); returns the tensor file's name."""
    from compress.prune.serialize import MODULE_FILE, save_module

    save_module(model, folder)
    return MODULE_FILE


def load_saved(folder: Path, unpruned: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """A model written by `save`: `unpruned()` builds the source model with its head, the files the rest."""
    from compress.prune.serialize import load_module

    return load_module(folder, unpruned).eval()


def io_spec(m: VisionModelOptions, num_classes: int) -> IOSpec:
    return IOSpec(
        inputs={INPUT: ("batch", m.channels, m.input_size, m.input_size)},
        outputs={OUTPUT: ("batch", num_classes)},
        dtypes={INPUT: "float32"},
    )


def export(model: torch.nn.Module, example: np.ndarray, path: Path, spec: IOSpec, *, opset: int, dynamo: bool) -> None:
    """ONNX `input` -> `logits` with a dynamic batch (TorchScript exporter or, with `dynamo`, torch.export)."""
    import torch

    kwargs: dict[str, Any] = {"input_names": [INPUT], "output_names": [OUTPUT], "opset_version": opset}
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=4096)
        kwargs["dynamic_shapes"] = {"x": {0: batch}} if _forward_arg(model) == "x" else ({0: batch},)
    else:
        kwargs["dynamic_axes"] = {name: {0: "batch"} for name in (*spec.inputs, *spec.outputs)}
    torch.onnx.export(model, (torch.from_numpy(example),), str(path), dynamo=dynamo, **kwargs)


def _forward_arg(model: torch.nn.Module) -> str:
    params = list(inspect.signature(model.forward).parameters)
    return params[0] if params else "x"
