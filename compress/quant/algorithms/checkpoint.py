"""Read and write AutoGPTQ / GPTQModel checkpoint folders without either library.

A folder holds ``quantize_config.json`` (or ``config.json`` with a ``quantization_config`` entry)
and ``*.safetensors`` with ``<module>.qweight / .qzeros / .scales / .g_idx`` per quantized Linear
(layout in ``packing``). ``checkpoint_format`` ``gptq`` (v1, the default when absent: AutoGPTQ and
what GPTQModel saves for compatibility) stores zero points minus one; ``gptq_v2`` stores them as is.
Other formats (``marlin``, ``bitblas``, ``awq`` GEMM packing) and per-layer ``dynamic`` overrides are
refused with a ValueError (naming the folder and the key) rather than misread.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from compress.errors import MissingDependencyError
from compress.quant.primitives.packing import GPTQ_FORMATS, GPTQTensors, pack_gptq, unpack_gptq
from compress.quant.primitives.weight import QuantizedWeight

_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


class GPTQCheckpointConfig(BaseModel):
    """The subset of ``quantize_config.json`` that decides how tensors are read."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    bits: int = Field(4, description="Code width; only 4 is read here.")
    group_size: int = Field(128, description="Columns per group; -1 per row.")
    desc_act: bool = Field(False, description="Act-order was used (g_idx may be non-trivial).")
    sym: bool = Field(True, description="Symmetric quantization.")
    checkpoint_format: str = Field("gptq", description="gptq (v1, zeros stored minus one) or gptq_v2.")


def _safetensors():
    try:
        from safetensors.numpy import load_file, save_file
    except ImportError as e:  # pragma: no cover - safetensors is in the llm extra
        raise MissingDependencyError("safetensors", "llm", "GPTQ checkpoints") from e
    return load_file, save_file


def read_gptq_config(folder: str | Path) -> GPTQCheckpointConfig:
    """Parse ``quantize_config.json`` or ``config.json``'s ``quantization_config``."""
    folder = Path(folder)
    qc = folder / "quantize_config.json"
    if qc.exists():
        raw = json.loads(qc.read_text())
    elif (folder / "config.json").exists() and "quantization_config" in json.loads(
        (folder / "config.json").read_text()
    ):
        raw = json.loads((folder / "config.json").read_text())["quantization_config"]
    else:
        raise ValueError(f"{folder}: no quantize_config.json nor config.json with quantization_config")
    if raw.get("quant_method", "gptq") != "gptq":
        raise ValueError(f"{folder}: quant_method = {raw['quant_method']!r}; allowed: gptq")
    if raw.get("dynamic"):
        raise ValueError(f"{folder}: per-layer 'dynamic' overrides are not supported")
    fmt = raw.get("checkpoint_format") or raw.get("meta", {}).get("checkpoint_format") or "gptq"
    cfg = GPTQCheckpointConfig(**{**raw, "checkpoint_format": fmt})
    if cfg.checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"{folder}: checkpoint_format = {fmt!r}; allowed: {', '.join(GPTQ_FORMATS)}")
    if cfg.bits != 4:
        raise ValueError(f"{folder}: bits = {cfg.bits}; allowed: 4")
    return cfg


def read_gptq_checkpoint(folder: str | Path) -> tuple[dict[str, QuantizedWeight], GPTQCheckpointConfig]:
    """Load every ``<name>.qweight`` group of the folder's safetensors into ``{name: QuantizedWeight}``."""
    folder = Path(folder)
    cfg = read_gptq_config(folder)
    load_file, _ = _safetensors()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no *.safetensors file")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    out: dict[str, QuantizedWeight] = {}
    for name in names:
        missing = [s for s in _SUFFIXES[:3] if f"{name}.{s}" not in tensors]
        if missing:
            raise ValueError(f"{folder}: {name} lacks {missing}")
        k = tensors[f"{name}.qweight"].shape[0] * 8
        g_idx = tensors.get(f"{name}.g_idx")
        if g_idx is None:
            g = k if cfg.group_size == -1 else cfg.group_size
            g_idx = (np.arange(k) // g).astype(np.int32)
        t = GPTQTensors(
            qweight=tensors[f"{name}.qweight"].astype(np.int32),
            qzeros=tensors[f"{name}.qzeros"].astype(np.int32),
            scales=tensors[f"{name}.scales"].astype(np.float16),
            g_idx=g_idx.astype(np.int32),
        )
        try:
            out[name] = unpack_gptq(t, cfg.group_size, cfg.sym, cfg.checkpoint_format)
        except ValueError as exc:  # tensors that disagree with each other or with quantize_config.json
            raise ValueError(f"{folder}: {name}: {exc}") from None
    return out, cfg


def write_gptq_checkpoint(
    folder: str | Path,
    quantized: Mapping[str, QuantizedWeight],
    *,
    checkpoint_format: str = "gptq",
    other_tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``quantize_config.json`` and ``model.safetensors`` (atomically renamed) for ``quantized``.

    All weights must share bits, group size and symmetry (the format has one config per folder).
    ``other_tensors`` (norms, embeddings, ...) are stored beside them unchanged.
    """
    if not quantized:
        raise ValueError("no quantized weight to write")
    first = next(iter(quantized.values()))
    for name, qw in quantized.items():
        if (qw.bits, qw.group_size, qw.symmetric) != (first.bits, first.group_size, first.symmetric):
            raise ValueError(
                f"{name}: bits/group_size/symmetric = {(qw.bits, qw.group_size, qw.symmetric)} differ from "
                f"{(first.bits, first.group_size, first.symmetric)}; a GPTQ folder holds one setting"
            )
    _, save_file = _safetensors()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for name, qw in quantized.items():
        t = pack_gptq(qw, checkpoint_format)
        tensors.update(
            {
                f"{name}.qweight": t.qweight,
                f"{name}.qzeros": t.qzeros,
                f"{name}.scales": t.scales,
                f"{name}.g_idx": t.g_idx,
            }
        )
    for name, v in (other_tensors or {}).items():
        tensors[name] = v.detach().cpu().numpy()
    tmp = folder / "model.safetensors.tmp"
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}  # safetensors writes raw buffers
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    config = {
        "bits": first.bits,
        "group_size": first.group_size,
        "desc_act": any(not qw.has_trivial_g_idx() for qw in quantized.values()),
        "sym": first.symmetric,
        "checkpoint_format": checkpoint_format,
        "quant_method": "gptq",
    }
    tmpc = folder / "quantize_config.json.tmp"
    tmpc.write_text(json.dumps(config, indent=2))
    os.replace(tmpc, folder / "quantize_config.json")
    return folder
