"""Saving torch modules, pruned ones included, without pickles.

A pickle (`torch.save(model)`) runs code when it is loaded: a `model.pt` planted in a run folder would
execute on the next `compress run`. So a module is stored as `model.safetensors` (its state dict: numbers
only) and `architecture.json` (every module's name and type, and the widths pruning changes). A pruned
model's widths no longer follow its class's constructor, so loading builds the model with the caller's
`build()` (the pipeline's own model source: nothing read from the folder names code), sets the recorded
widths, and loads the tensors strictly:

    save_module(model, folder)
    again = load_module(folder, build=lambda: MyNet(num_classes=10))

What the file cannot describe is refused with the module and its type. A module whose own parameter only
follows its neighbours' widths (ConvNeXt's `layer_scale`) names it in `resizable_parameters`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.artifact import write_json_atomic
from compress.errors import StageError
from compress.tensorfile import read_tensors, write_tensors

MODULE_FILE = "model.safetensors"
ARCH_FILE = "architecture.json"
FORMAT, VERSION = "compress.torch-module", 1

# The width attributes torch-pruning 1.6 changes (torch_pruning/pruner/function.py), by module type.
_WIDTHS: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.batchnorm._NormBase, ("num_features",)),  # BatchNorm*, InstanceNorm*
    (nn.LayerNorm, ("normalized_shape",)),
    (nn.RMSNorm, ("normalized_shape",)),
    (nn.GroupNorm, ("num_groups", "num_channels")),
    (nn.PReLU, ("num_parameters",)),
    (nn.Embedding, ("num_embeddings", "embedding_dim")),
    (nn.MultiheadAttention, ("embed_dim", "kdim", "vdim", "head_dim", "num_heads")),
    (nn.RNNBase, ("input_size", "hidden_size", "proj_size")),
)


def save_module(model: nn.Module, folder: str | os.PathLike[str]) -> Path:
    """Write `model` to `folder` as `model.safetensors` + `architecture.json`; return the tensor file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / ARCH_FILE, describe(model))
    path = folder / MODULE_FILE
    write_tensors(path, model.state_dict())
    return path


def load_module(folder: str | os.PathLike[str], build: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild a module written by `save_module`: `build()` makes the unpruned model, the files the rest."""
    folder = Path(folder)
    arch = _read_architecture(folder)
    with torch.random.fork_rng(devices=[]):  # building initialises weights: the caller's RNG stream stays
        model = build()
    _apply_widths(model, arch["modules"], folder)
    state, _ = read_tensors(folder / MODULE_FILE)
    _fit_tensors(model, state, folder)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise StageError(f"{folder / MODULE_FILE}: does not fit the model built from the source: {exc}") from None
    _retie(model, arch.get("tied", {}))
    return model


def describe(model: nn.Module) -> dict[str, Any]:
    """The JSON `architecture.json` holds: modules in order with their widths, and tied tensors."""
    modules = []
    for name, module in model.named_modules():
        if type(module).get_extra_state is not nn.Module.get_extra_state:
            raise StageError(
                f"module '{name}' ({_type_name(module)}) keeps extra state, which {ARCH_FILE} cannot describe"
            )
        entry: dict[str, Any] = {"name": name, "type": _type_name(module)}
        widths = _width_names(module)
        if widths:
            entry["widths"] = {attr: getattr(module, attr) for attr in widths}
        modules.append(entry)
    return {"format": FORMAT, "version": VERSION, "modules": modules, "tied": _tied(model)}


def _type_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _width_names(module: nn.Module) -> tuple[str, ...]:
    return next((names for cls, names in _WIDTHS if isinstance(module, cls)), ())


def _tied(model: nn.Module) -> dict[str, str]:
    """{name: first name} of parameters and buffers registered under more than one name."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) in first:
            tied[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return tied


def _read_architecture(folder: Path) -> dict[str, Any]:
    for file in (ARCH_FILE, MODULE_FILE):
        if not (folder / file).is_file():
            raise StageError(
                f"{folder}: no {file}; torch artifacts are {MODULE_FILE} + {ARCH_FILE} (a pickled model.pt "
                "from an older compress is never loaded): rerun with --force and the artifact's name"
            )
    try:
        arch = json.loads((folder / ARCH_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StageError(f"{folder / ARCH_FILE}: unreadable ({exc})") from None
    if not isinstance(arch, dict) or arch.get("format") != FORMAT or arch.get("version") != VERSION:
        raise StageError(f"{folder / ARCH_FILE}: not a {FORMAT} file of version {VERSION}")
    modules, tied = arch.get("modules"), arch.get("tied", {})
    if not (isinstance(modules, list) and all(isinstance(m, dict) for m in modules) and isinstance(tied, dict)):
        raise StageError(f"{folder / ARCH_FILE}: 'modules' must be a list of objects and 'tied' an object")
    return arch


def _apply_widths(model: nn.Module, recorded: list[dict[str, Any]], folder: Path) -> None:
    """Give the freshly built modules the recorded widths; names and types must match exactly."""
    built = dict(model.named_modules())
    names = [entry.get("name") for entry in recorded]
    if names != list(built):
        extra = sorted(set(map(str, names)) ^ set(built))[:5]
        raise StageError(
            f"{folder / ARCH_FILE}: its modules differ from those of the model built from the source "
            f"(first differences: {extra or 'order'}); was the model source changed?"
        )
    for entry in recorded:
        module = built[entry["name"]]
        if entry.get("type") != _type_name(module):
            raise StageError(
                f"{folder / ARCH_FILE}: module '{entry['name']}' is {entry.get('type')}, "
                f"the model source builds {_type_name(module)}"
            )
        allowed = _width_names(module)
        for attr, value in (entry.get("widths") or {}).items():
            if attr not in allowed or not _is_width(value):
                raise StageError(f"{folder / ARCH_FILE}: module '{entry['name']}': bad width {attr} = {value!r}")
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)


def _is_width(value: Any) -> bool:
    if isinstance(value, list):
        return all(_is_width(v) for v in value)
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def _fit_tensors(model: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Resize the tensors of modules whose widths were restored to the stored shapes; refuse the others."""
    expected = model.state_dict(keep_vars=True)
    for key, tensor in state.items():
        if key not in expected or expected[key].shape == tensor.shape:
            continue  # a missing or extra key is load_state_dict's (strict) to report
        owner, _, attr = key.rpartition(".")
        module = model.get_submodule(owner)
        if not _width_names(module) and attr not in getattr(module, "resizable_parameters", ()):
            known = ", ".join(cls.__name__ for cls, _ in _WIDTHS)
            raise StageError(
                f"{folder / MODULE_FILE}: '{key}' has shape {tuple(tensor.shape)}, but module '{owner}' "
                f"({_type_name(module)}) is built with {tuple(expected[key].shape)}; {ARCH_FILE} records the "
                f"widths of {known} only, so a resized {type(module).__name__} cannot be rebuilt"
            )
        placeholder = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")  # replaced on load (assign)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(placeholder, requires_grad=expected[key].requires_grad)
        else:
            module._buffers[attr] = placeholder


def _retie(model: nn.Module, tied: dict[str, str]) -> None:
    """Register the first tensor again under each tied name (loading gave each name its own Parameter)."""
    for name, first in tied.items():
        owner, _, attr = name.rpartition(".")
        source_owner, _, source_attr = str(first).rpartition(".")
        try:
            module = model.get_submodule(owner)
            value = getattr(model.get_submodule(source_owner), source_attr)
        except AttributeError:
            raise StageError(f"{ARCH_FILE}: tied tensor '{name}' -> '{first}' names no tensor of the model") from None
        if attr in module._parameters:
            module._parameters[attr] = value
        elif attr in module._buffers:
            module._buffers[attr] = value
        else:
            raise StageError(f"{ARCH_FILE}: tied tensor '{name}' is neither a parameter nor a buffer of the model")
