"""A GGUF file written as a sharded Hugging Face safetensors folder one tensor at a time, so a GGUF model larger
than memory converts (peak: about one shard plus one tensor being dequantised).

    write_gguf_folder(Path("model.Q4_K_M.gguf"), out, dtype="float32", max_shard_bytes=2 * 10**9)

What is transformers' (its GGUF loader, `transformers.modeling_gguf_pytorch_utils`, which `from_pretrained(
gguf_file=...)` runs for every architecture compress supports), called as it calls them:

- the config (`load_gguf_checkpoint(return_tensors=False)`, the metadata alone, into the config class as
  `AutoConfig.from_pretrained(gguf_file=...)` does) and the tokenizer (`AutoTokenizer.from_pretrained(
  gguf_file=...)`): small, built whole;
- the GGUF -> Hugging Face name map (`get_gguf_hf_weights_map`, on a skeleton built on the meta device, so no
  weight is allocated) and the per-architecture tensor processor (`TENSOR_PROCESSORS`: Llama's q/k
  un-permutation, Gemma's norm offset, ...), given the GGUF-parsed config as transformers gives it;
- dequantisation: the `gguf` package's `gguf.quants.dequantize`, on the memory-mapped `GGUFReader` data.

What is ours, and why: transformers' `load_gguf_checkpoint(return_tensors=True)` holds every tensor of the model
in one dict (and `from_pretrained` then a model too), so its loop is re-run here tensor by tensor with the result
flushed to a shard (`safetensors.torch.save_file`) whenever the next tensor would push it past
`max_shard_bytes`; a quantised tensor is dequantised in blocks of rows into its output (GGUF blocks lie within a
row, so the values are the same as a whole-tensor call) to bound the temporaries. Architectures transformers
converts otherwise are refused by name: those its newer GGUF path handles (`integrations.gguf.GGUF_ARCHS`), and
processors that assemble tensors across several GGUF tensors (MoE experts), which one-at-a-time cannot do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import ConfigError

DTYPES = ("float32", "bfloat16")
DEFAULT_SHARD_BYTES = 2 * 10**9
INDEX_FILE = "model.safetensors.index.json"
_CHUNK_BYTES = 64 << 20  # output bytes dequantised at once from one tensor


def write_gguf_folder(
    path: Path, out: Path, *, dtype: str = "float32", max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> dict[str, Any]:
    """Write `path` into the existing folder `out`: `model-0000i-of-0000n.safetensors` shards and their index,
    config.json, generation_config.json and the tokenizer files. Returns the index.

    Not atomic: the caller writes into a temporary folder and renames it (`model_io.convert_gguf`).
    """
    import torch
    import transformers
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
        )
    except ImportError:
        raise ConfigError(
            f"gguf:{path}: converting a GGUF needs transformers' GGUF tensor map (`get_gguf_hf_weights_map`, "
            f"`TENSOR_PROCESSORS`), which transformers {transformers.__version__} lacks; pip install -U transformers"
        ) from None
    try:
        from transformers.integrations.gguf import GGUF_ARCHS
    except ImportError:  # a transformers without the newer GGUF path: every architecture is the legacy loader's
        GGUF_ARCHS = {}

    if dtype not in DTYPES:
        raise ConfigError(f"gguf:{path}: dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    torch_dtype = getattr(torch, dtype)
    folder, name = str(path.parent), path.name
    reader = GGUFReader(str(path))
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    if arch in GGUF_ARCHS:
        raise ConfigError(
            f"gguf:{path}: architecture '{arch}' goes through transformers' newer GGUF loader, which the shard-by-"
            "shard conversion does not follow yet"
        )
    parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    config = CONFIG_MAPPING[parsed["config"]["model_type"]].from_dict(parsed["config"])  # as AutoConfig does
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    processor_cls = TENSOR_PROCESSORS.get(arch, TensorProcessor)
    processor = processor_cls(config=parsed["config"])
    names = get_gguf_hf_weights_map(skeleton, processor)
    parsed["tensors"] = {}

    shards: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    total = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, str(out / f".shard-{len(shards) + 1:05d}.tmp"), metadata={"format": "pt"})
            shards.append(sorted(pending))
        pending, pending_bytes = {}, 0

    for tensor in reader.tensors:
        result = processor.process(
            weights=_dequantized(tensor), name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed
        )
        if parsed["tensors"]:
            raise ConfigError(
                f"gguf:{path}: transformers' {processor_cls.__name__} assembles tensors across GGUF tensors "
                f"({tensor.name}); the shard-by-shard conversion converts one tensor at a time"
            )
        if result.name not in names:
            continue  # as transformers: a GGUF tensor the model has no parameter for (e.g. rope_freqs)
        weights = torch.from_numpy(np.ascontiguousarray(result.weights)).to(torch_dtype)
        nbytes = weights.numel() * weights.element_size()
        if pending and pending_bytes + nbytes > max_shard_bytes:
            flush()
        pending[names[result.name]] = weights
        pending_bytes += nbytes
        total += nbytes
    flush()

    written = {n for shard in shards for n in shard}
    tied = _tied_keys(skeleton) if config.tie_word_embeddings else set()
    missing = sorted(set(skeleton.state_dict()) - written - tied)
    if missing:
        raise ConfigError(f"gguf:{path}: no GGUF tensor for {len(missing)} parameters, e.g. {missing[:5]}")
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (out / f".shard-{i:05d}.tmp").rename(out / file)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    config.architectures = [type(skeleton).__name__]
    config.dtype = dtype
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    return index


def _dequantized(tensor: Any) -> np.ndarray:
    """A `GGUFReader` tensor as float32 in numpy order, dequantised `_CHUNK_BYTES` of output at a time."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data, kind = tensor.data, tensor.tensor_type
    if kind == GGMLQuantizationType.F32 or data.ndim < 2:
        return np.array(dequantize(data, kind), dtype=np.float32)  # a copy: the data is the read-only map
    cols = int(tensor.shape[0])  # ggml's ne0: the length of a row
    rows = data.reshape(-1, data.shape[-1])
    out = np.empty((rows.shape[0], cols), dtype=np.float32)
    step = max(1, _CHUNK_BYTES // (4 * cols))
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = dequantize(rows[start : start + step], kind)
    return out.reshape(*data.shape[:-1], cols)


def _tied_keys(model: Any) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied if not isinstance(tied, dict) else tied.keys())
