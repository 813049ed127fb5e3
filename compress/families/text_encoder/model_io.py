"""Model I/O of the text-encoder family: load, save, export, input names.

Sources (`model.source`):
- `hf:FOLDER_OR_ID`: transformers `AutoModel` + `AutoTokenizer` (a local folder needs no network);
- `python:module:function`: returns `(model, tokenizer)`, a transformers model and its tokenizer.

The model every stage sees is a `SentenceEncoder`: the backbone, then mean pooling over the tokens the
attention mask keeps (optionally L2-normalised), so the exported ONNX graph maps
`input_ids, attention_mask[, token_type_ids]` (dynamic batch and sequence) straight to `embeddings`.
Torch artifacts are the backbone's `save_pretrained` folder (safetensors) + tokenizer files +
`sentence_encoder.json` (pooling, normalisation, input names): nothing in them is unpickled.
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress.errors import ConfigError
from compress.families.text_encoder.options import local_folder, parse_source

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: the forward order of a SentenceEncoder (and so of TorchSession's positional inputs)
INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "embeddings"
ENCODER_FILE = "sentence_encoder.json"


class SentenceEncoder(nn.Module):
    """Backbone + masked mean pooling: `(input_ids, attention_mask[, token_type_ids])` -> `(B, H)` embeddings."""

    def __init__(self, backbone: nn.Module, input_names: tuple[str, ...], normalize: bool) -> None:
        super().__init__()
        self.backbone, self.input_names, self.normalize = backbone, input_names, normalize

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**kwargs).last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, H)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)


def input_names(backbone: nn.Module, tokenizer: Any) -> tuple[str, ...]:
    """input_ids and attention_mask always; token_type_ids when the tokenizer makes them and the model takes them."""
    takes = inspect.signature(backbone.forward).parameters
    made = set(getattr(tokenizer, "model_input_names", ())) | {"input_ids", "attention_mask"}
    return tuple(n for n in INPUT_ORDER if n in made and n in takes)


def wrap(backbone: nn.Module, names: tuple[str, ...], normalize: bool) -> SentenceEncoder:
    """A SentenceEncoder in eval mode; the backbone's pooler head is dropped when its class can go without one
    (mean pooling never reads it, and an unused Linear would be quantized but absent from the graph)."""
    optional_pooler = "add_pooling_layer" in inspect.signature(type(backbone)).parameters
    if optional_pooler and getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    return SentenceEncoder(backbone, names, normalize).eval()


def load(
    source: str, *, base_dir: Path, cache_dir: Path, normalize: bool, trust_remote_code: bool
) -> tuple[SentenceEncoder, Any]:
    """(SentenceEncoder in float32 eval mode, tokenizer) from a source string."""
    scheme, rest = parse_source(source)
    if scheme == "python":
        from compress.sources import import_callable

        result = import_callable(source)()
        backbone, tokenizer = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
        if not hasattr(backbone, "save_pretrained") or not callable(tokenizer):
            raise ConfigError(
                f"model.source = {source}: returned {type(result).__name__}; expected (model, tokenizer), a "
                "transformers model (save_pretrained) and its tokenizer"
            )
    else:
        backbone, tokenizer = _load_hf(rest, source, base_dir, cache_dir, trust_remote_code)
    backbone = backbone.to(torch.float32)
    return wrap(backbone, input_names(backbone, tokenizer), normalize), tokenizer


def _load_hf(rest: str, source: str, base_dir: Path, cache_dir: Path, trust_remote_code: bool) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    from compress.sources import quiet_transformers

    quiet_transformers()
    folder = local_folder(rest, base_dir)
    name = str(folder) if folder is not None else rest
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if folder is None:
        kwargs["cache_dir"] = str(cache_dir / "hf")
    where = "folder" if folder is not None else "hub id (is the hub reachable? a local folder works offline)"
    try:
        backbone = AutoModel.from_pretrained(name, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.source = {source}: could not load {where}: {exc}") from exc
    return backbone.eval(), tokenizer


def save(model: SentenceEncoder, tokenizer: Any, folder: Path) -> None:
    model.backbone.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    spec = {"pooling": "mean", "normalize": model.normalize, "inputs": list(model.input_names)}
    (folder / ENCODER_FILE).write_text(json.dumps(spec, indent=1))


def load_saved(folder: Path, *, trust_remote_code: bool) -> SentenceEncoder:
    """A torch artifact written by `save`, in eval mode."""
    from transformers import AutoModel

    from compress.sources import quiet_transformers

    quiet_transformers()
    spec = json.loads((folder / ENCODER_FILE).read_text())
    backbone: PreTrainedModel = AutoModel.from_pretrained(
        folder, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    return wrap(backbone.eval(), tuple(spec["inputs"]), bool(spec["normalize"]))


def export(model: SentenceEncoder, example: dict[str, Any], path: Path, *, opset: int, dynamo: bool) -> None:
    """ONNX with dynamic batch and sequence on every input; `embeddings` (batch, hidden) out."""
    names = list(model.input_names)
    args = tuple(torch.from_numpy(example[n]) for n in names)
    kwargs: dict[str, Any] = {"input_names": names, "output_names": [OUTPUT], "opset_version": opset}
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=4096)
        sequence = torch.export.Dim("sequence", min=2, max=8192)
        kwargs["dynamic_shapes"] = {n: {0: batch, 1: sequence} for n in names}
    else:
        kwargs["dynamic_axes"] = {**{n: {0: "batch", 1: "sequence"} for n in names}, OUTPUT: {0: "batch"}}
    with warnings.catch_warnings():  # the tracer's notes on shape checks that are constant for an encoder
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(model, args, str(path), dynamo=dynamo, **kwargs)
