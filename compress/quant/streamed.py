"""Layer-streamed INT4 RTN, GPTQ and AWQ of a decoder checkpoint folder, for models larger than this machine's memory.

    folder = stream_quantize("hf/llama-3.2-3b", "work/gptq", WeightQuantConfig(group_size=128), lm_head="int4")
    folder = stream_quantize("hf/llama-3.2-3b", "work/gptq", GPTQConfig(group_size=128), calibration=windows)
    folder = stream_quantize("hf/llama-3.2-3b", "work/awq", AWQConfig(group_size=128), calibration=windows,
                             activation_dtype="bfloat16")
    build_streamed_decoder(folder, "work/genai-int4")  # onnxruntime-genai's fused INT4 graph

Why streamed: RTN, GPTQ and AWQ quantize one decoder layer at a time, so the float model never has to be in memory
at once: a 7B model is 28 GB in float32 on a 24 GB machine. The model is built as a skeleton on the meta device
(`from_config` under `torch.device("meta")`: no bytes allocated); it names each layer's Linears. For each layer
in turn the layer's tensors alone are read from the safetensors shards (`safe_open`), its Linears quantized, the
result written as one AutoGPTQ-layout file per layer, and the layer freed.

- RTN: `compress.quant.algorithms.rtn.rtn_quantize` on each stored weight, the in-memory path's function, so
  codes, scales and zero points are bit-identical (tests/quant/test_streamed.py).
- GPTQ: layer 0's inputs and call arguments are captured by a forward of the skeleton with only the embedding
  (read from the checkpoint) and the rotary embedding (rebuilt from the config) materialised, stopped at layer
  0's pre-hook; every layer then gets the same arguments (architectures with sliding-window layers are
  refused). Each layer is materialised in float32 (`to_empty` + `load_state_dict`), quantized with the
  in-memory path's Hessian hooks and sequential groups (`gptq.quantize_with_hooks`,
  `sequential.layer_linear_groups`), and its outputs from the quantized weights are the next layer's inputs:
  the codes come out identical to `gptq_quantize_model`'s. The activations are kept float32 by default (16
  windows of 512 on an 8B shape: 134 MB) and are also written after each layer (`hidden.activations`) to resume
  from. `activation_dtype: bfloat16 | float16` keeps them (in memory and in that file) at half the size; every
  layer still computes in float32 (each batch is cast up as it enters the layer), so only the rounding of the
  hidden states between layers changes, and the codes move a little (tests/quant/test_streamed_awq.py).
- AWQ (`AWQConfig`, then RTN or GPTQ as its `quantizer` says): the same capture and hand-over as GPTQ, and
  `awq.awq_quantize_layer` on each materialised float32 layer, the function `awq_quantize_model` calls; every
  fold of a scale group (attention / MLP norm, v rows, up rows: `DecoderArch.scale_groups`) stays inside its
  layer, so no fold crosses a layer file and the codes, scales and zeros are identical to the in-memory
  path's. The layer file holds the folded norms (and any folded bias) in float32, as the in-memory model does;
  groups AWQ leaves unscaled (v -> o under grouped-query attention) are in the sidecar (`awq_unscaled`).
- The embedding, final norm and head go to one more file (`lm_head: int4` quantizes the head, or the tied
  embedding, by RTN and packs it in blocks of rows: RTN is row-wise, so the blocks give the same bytes as the
  whole matrix without its float32 copy and int32 packing; a tied table is then not stored in float at all).

The output folder is the quantized checkpoint onnxruntime-genai's model builder reads (`config.json` with a
GPTQ `quantization_config`, the builder reads every `*.safetensors` in it; see `compress.genai.build` for the
layout and the zero-point shift its loader needs). `build_streamed_decoder` writes the builder's fused graph
from it one layer at a time (`compress.genai.layered`: the builder runs on a 2-layer copy only, since on the
whole folder it holds far more than the quantized weights: README, "Large models").

Resume: each layer file has a sidecar `layer-NNNNN.json` with its sha256 and the key of what made it (the
quantization settings, the layer's tensor names and the size and mtime of the source shards it read, the
source config.json, the calibration digest, a non-float32 activation dtype; GPTQ / AWQ keys chain on the
previous layers'). A killed run verifies the files of finished layers and starts at the first layer without a
valid one (GPTQ / AWQ: after the last layer whose outputs were kept); files are written under a temporary name
and renamed.

A GGUF source streams through its conversion: `model_io.convert_gguf` writes it as a sharded safetensors folder one
tensor at a time (a linked `gguf:FILE` source links that folder, `families/causal_lm/linked.py`).

Refused: sliding-window architectures for GPTQ / AWQ (Gemma 2/3: layers take different arguments, and every
layer here gets layer 0's). Not here yet: fused-projection architectures (Phi-3's qkv_proj: the builder's GPTQ
loader reads Llama tensor names only).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from compress.families.causal_lm.archs import DecoderArch, arch_for_model_type
from compress.hashing import sha256_file, sha256_json
from compress.quant.algorithms.awq import AWQConfig, awq_quantize_layer
from compress.quant.algorithms.gptq import GPTQConfig, quantize_with_hooks
from compress.quant.algorithms.rtn import rtn_quantize
from compress.quant.algorithms.sequential import (
    LayerCall,
    as_model_kwargs,
    default_filter,
    layer_linear_groups,
    layer_output,
    run_layer,
    with_hidden,
)
from compress.quant.primitives.packing import pack_gptq, shift_zero_points
from compress.quant.primitives.weight import QuantizedWeight, WeightQuantConfig
from compress.quant.scheme import ActivationDtype

STREAM_VERSION = 2  # joins every file's key: a change of the layout invalidates finished files (2: tied head)
HeadMode = Literal["float", "int4"]
REST_FILE = "rest.safetensors"
#: streamed GPTQ / AWQ: outputs (in `activation_dtype`) of the last finished layer, to resume from (safetensors
#: bytes, but not named *.safetensors: the builder reads every such file of the folder)
HIDDEN_FILE = "hidden.activations"
HEAD_ROWS = 8192  # rows of the head quantized at once: 8192 x 4096 float32 = 128 MiB
Say = Callable[[str], None]


@dataclass(frozen=True)
class LayerTiming:
    """One finished step: decoder layer `index`, or (`head`) the embedding / final norm / head file."""

    index: int
    seconds: float
    reused: bool  # verified and kept from an earlier run
    peak_rss_mb: float = 0.0  # this process's high-water mark when the step ended (`memory.high_water_mb`)
    head: bool = False


@dataclass(frozen=True)
class StreamResult:
    folder: Path  # the quantized checkpoint (builder input)
    layers: tuple[LayerTiming, ...]
    head_seconds: float
    awq_unscaled: tuple[str, ...] = ()  # AWQ scale groups left unscaled (their fold would not be exact)


class Checkpoint:
    """The tensors of a safetensors folder (one file or shards + `model.safetensors.index.json`), read lazily."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.exists():
            self.where: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{folder}: no *.safetensors file and no model.safetensors.index.json")
            from safetensors import safe_open

            self.where = {}
            for f in files:
                with safe_open(str(f), framework="pt") as fh:
                    self.where.update({name: f.name for name in fh.keys()})  # noqa: SIM118 - not a dict

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.where if n.startswith(prefix))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """These tensors only, in their stored dtype (a shard is opened, never loaded whole)."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        for file, members in by_file.items():
            with safe_open(str(self.folder / file), framework="pt") as fh:
                out.update({n: fh.get_tensor(n) for n in members})
        return out

    def stamp(self, names: list[str]) -> list[list[Any]]:
        """(file, size, mtime_ns) of the shards holding `names`: what a finished layer's key says it read."""
        files = sorted({self.where[n] for n in names})
        return [[f, (st := (self.folder / f).stat()).st_size, st.st_mtime_ns] for f in files]


def meta_skeleton(config: Any) -> torch.nn.Module:
    """The model built on the meta device: module names and shapes, no weights allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _gptq_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """AutoGPTQ v1 tensors of one Linear for the builder's GPTQ loader (zero points `shift_zero_points(qw, -1)`:
    its loader adds 1 modulo 16)."""
    t = pack_gptq(shift_zero_points(qw, -1), "gptq_v2")  # v2 packing stores the zeros as given: the shifted v1 values
    return {
        f"{name}.qweight": torch.from_numpy(t.qweight),
        f"{name}.qzeros": torch.from_numpy(t.qzeros),
        f"{name}.scales": torch.from_numpy(t.scales),
        f"{name}.g_idx": torch.from_numpy(t.g_idx),
    }


def gptq_head_tensors(
    name: str, weight: torch.Tensor, config: WeightQuantConfig, rows: int = HEAD_ROWS
) -> dict[str, torch.Tensor]:
    """`_gptq_tensors(name, rtn_quantize(weight))` computed in blocks of output rows, with the same bytes.

    Why blocks: for a 128k-token head the float32 copy, the codes and the int32 packing of the whole matrix
    take several GB at once. RTN groups run along the input columns, so rows are independent; the GPTQ
    tensors are [.., out] along their last axis (qzeros packs 8 outputs per int32, hence `rows % 8 == 0`).
    """
    if rows % 8:
        raise ValueError(f"rows = {rows}; a multiple of 8 (qzeros pack 8 output features per int32)")
    parts = [_gptq_tensors(name, rtn_quantize(weight[i : i + rows], config)) for i in range(0, weight.shape[0], rows)]
    g_idx = f"{name}.g_idx"
    out = {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0] if k != g_idx}  # (.., out)
    out[g_idx] = parts[0][g_idx]  # per input column: the same for every block
    return out


def _save_verified(tensors: dict[str, torch.Tensor], path: Path, key: str, extra: dict[str, Any]) -> None:
    """Write `path` and its sidecar (sha256 + key) atomically: the sidecar appears last, so it vouches."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    side = {"key": key, "sha256": sha256_file(path), **extra}
    side_path = path.with_suffix(".json")
    side_tmp = side_path.with_name(f".{side_path.name}.tmp-{os.getpid()}")
    side_tmp.write_text(json.dumps(side, indent=2))
    os.replace(side_tmp, side_path)


def _finished(path: Path, key: str) -> bool:
    """True when `path` was written for `key` and still has the bytes its sidecar recorded."""
    side_path = path.with_suffix(".json")
    if not (path.exists() and side_path.exists()):
        return False
    try:
        side = json.loads(side_path.read_text())
    except (OSError, ValueError):
        return False
    return side.get("key") == key and side.get("sha256") == sha256_file(path)


def layer_linears(skeleton: torch.nn.Module, arch: DecoderArch, index: int) -> list[str]:
    """Full names of the Linears of decoder layer `index`, from the meta skeleton."""
    layer = skeleton.get_submodule(arch.layers)[index]
    prefix = f"{arch.layers}.{index}."
    return [prefix + n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]


def _quantize_layer(ckpt: Checkpoint, linears: list[str], prefix: str, cfg: WeightQuantConfig) -> dict[str, Any]:
    tensors = ckpt.read(ckpt.names(prefix))
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in linears:
            out.update(_gptq_tensors(module, rtn_quantize(t, cfg)))
        else:
            out[name] = t  # norms (and biases) as stored
    return out


class _Stop(Exception):
    """Raised by the capture hook on decoder layer 0: nothing after it runs."""


def capture_layer0(
    skeleton: torch.nn.Module, arch: DecoderArch, ckpt: Checkpoint, hf_config: Any, batches: list[Any]
) -> tuple[list[torch.Tensor], list[LayerCall]]:
    """Layer 0's hidden states and call arguments (mask, rotary cos/sin, positions) per calibration batch.

    Only the embedding (read from the checkpoint) and the rotary embedding (rebuilt from the config: its
    buffers are computed, not stored) are materialised; the forward stops at layer 0's pre-hook. Every layer of
    an architecture without sliding-window layers is called with these same arguments.
    """
    embed = skeleton.get_submodule(arch.embed)
    embed.to_empty(device="cpu")
    with torch.no_grad():
        embed.weight.copy_(ckpt.read([f"{arch.embed}.weight"])[f"{arch.embed}.weight"])
    base = skeleton.get_submodule(arch.layers.rsplit(".", 1)[0])
    rotary = getattr(base, "rotary_emb", None)
    if rotary is not None:
        base.rotary_emb = type(rotary)(config=hf_config)
    hidden: list[torch.Tensor] = []
    calls: list[LayerCall] = []

    def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rest = dict(kwargs)
        hs = args[0] if args else rest.pop("hidden_states")
        hidden.append(hs.detach())
        calls.append(LayerCall(tuple(args[1:]), rest))
        raise _Stop

    handle = skeleton.get_submodule(arch.layers)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                with contextlib.suppress(_Stop):
                    skeleton(**as_model_kwargs(batch), use_cache=False)
    finally:
        handle.remove()
        embed.to("meta")
    return hidden, calls


def _as_float32(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Forward pre-hook: the kept hidden states (any `ActivationDtype`) enter the layer in float32, one batch at a
    time, so a bf16 / fp16 copy is all that is held between the layer's calls."""
    return (args[0].to(torch.float32), *args[1:]), kwargs


def _kept(hidden: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """`hidden` in the kept dtype; ValueError when float16 cannot hold it (its largest finite value is 65504)."""
    kept = hidden.to(dtype)
    if dtype == torch.float16 and not bool(torch.isfinite(kept).all()) and bool(torch.isfinite(hidden).all()):
        raise ValueError(
            f"{what}: hidden states reach |h| = {float(hidden.abs().max()):.4g}, beyond float16's range (65504); "
            "use activation_dtype: bfloat16 (float32's range) or float32"
        )
    return kept


def _calibrated_layer(
    ckpt: Checkpoint,
    layer: torch.nn.Module,
    prefix: str,
    arch: DecoderArch,
    cfg: GPTQConfig | AWQConfig,
    hidden: list[torch.Tensor],
    calls: list[LayerCall],
    keep: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[str]]:
    """GPTQ or AWQ one materialised decoder layer as the in-memory path does, then its outputs from the quantized
    weights (kept in `keep`): the next layer's hidden states. Returns (file tensors, outputs, AWQ scale groups
    left unscaled).

    GPTQ: `gptq_quantize_model`'s sequential groups and Hessian hooks. AWQ: `awq_quantize_layer` itself; its folds
    (attention / MLP norm, v rows, up rows) are all inside the layer (`DecoderArch.scale_groups`), so the layer
    file holds the folded norms (and a folded v / up bias) in float32, the in-memory model's values."""
    stored = ckpt.read(ckpt.names(prefix))
    layer.to_empty(device="cpu")  # float32 parameters (the skeleton's dtype), as the in-memory path loads them
    layer.load_state_dict({n[len(prefix) :]: t for n, t in stored.items()}, strict=True)
    inputs = with_hidden(hidden, calls)
    unscaled: list[str] = []
    handle = layer.register_forward_pre_hook(_as_float32, with_kwargs=True)
    try:
        if isinstance(cfg, AWQConfig):
            qws = awq_quantize_layer(layer, inputs, default_filter, prefix, cfg, arch, on_skip=unscaled.append)
            floats = {prefix + n: t.detach().clone() for n, t in layer.state_dict().items()}
        else:
            groups = layer_linear_groups(layer, arch, default_filter, prefix)
            if not cfg.true_sequential and groups:
                groups = [[m for grp in groups for m in grp]]
            qws = {}
            for members in groups:
                qws.update(quantize_with_hooks(lambda: run_layer(layer, inputs), members, cfg))
            floats = stored
        with torch.no_grad():
            out_hidden = [_kept(layer_output(layer(*a, **k)), keep, f"{prefix}* outputs") for a, k in inputs]
    finally:
        handle.remove()
    layer.to("meta")
    tensors: dict[str, torch.Tensor] = {}
    for name in stored:
        module = name.removesuffix(".weight")
        if module in qws:
            tensors.update(_gptq_tensors(module, qws[module]))
        else:
            tensors[name] = floats[name]
    return tensors, out_hidden, unscaled


def _gptq_resume_point(out: Path, paths: list[Path], keys: list[str]) -> int:
    """The first layer streamed GPTQ must do: none when every layer is intact (the kept outputs are removed
    once the last layer is done, e.g. before a kill in the ONNX writer); else after the last layer whose
    outputs were kept, when it and every layer before it are intact; else 0."""
    if all(_finished(p, k) for p, k in zip(paths, keys, strict=True)):
        return len(paths)
    side = out / HIDDEN_FILE
    try:
        after = keys.index(json.loads(side.with_suffix(".json").read_text())["key"])
    except (OSError, ValueError, KeyError):
        return 0
    if not _finished(side, keys[after]) or not all(
        _finished(p, k) for p, k in zip(paths[: after + 1], keys[: after + 1], strict=True)
    ):
        return 0
    return after + 1


def _load_hidden(path: Path, n: int) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return [tensors[f"h{j}"] for j in range(n)]


def _calibration_digest(batches: list[Any]) -> str:
    import hashlib

    h = hashlib.sha256()
    for b in batches:
        for k, v in sorted(as_model_kwargs(b).items()):
            h.update(k.encode() + str(tuple(v.shape)).encode() + v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def stream_quantize(
    hf_folder: str | Path,
    out: str | Path,
    config: WeightQuantConfig,
    *,
    lm_head: HeadMode = "float",
    calibration: list[Any] | None = None,
    activation_dtype: ActivationDtype = "float32",
    say: Say | None = None,
    quantize_layer: Callable[..., dict[str, Any]] = _quantize_layer,
    on_layer: Callable[[LayerTiming], None] | None = None,
) -> StreamResult:
    """Quantize every decoder layer's Linears of `hf_folder`, one layer in memory at a time, into `out`.

    RTN for a `WeightQuantConfig`; GPTQ for a `GPTQConfig` and AWQ for an `AWQConfig`, on `calibration` (token
    tensors ``(1, T)`` or model kwargs), layer by layer on the outputs of the already quantized layers, as
    `gptq_quantize_model` / `awq_quantize_model`; those outputs are kept in `activation_dtype` between layers.
    `out` becomes the builder's input folder (module docstring); finished layers found there are verified and
    reused (GPTQ / AWQ also keep the last finished layer's outputs, `hidden.activations`, to resume from).
    `quantize_layer` is the RTN per-layer step (a test replaces it to simulate a kill). `on_layer` is called
    after each layer, once its file is written, and after the head step (`LayerTiming.head`): what a caller
    keeps to sum up a run that was killed and resumed (scripts/streamed_int4.py).
    """
    from transformers import AutoConfig

    from compress.memory import high_water_mb

    hf_folder, out = Path(hf_folder), Path(out)
    say = say or (lambda _m: None)
    if config.bits != 4 or config.group_size == -1:
        raise ValueError(f"{config}: streamed INT4 writes 4-bit GPTQ tensors with a power-of-two group >= 16")
    if lm_head not in ("float", "int4"):
        raise ValueError(f"lm_head = {lm_head!r}; allowed: float, int4")
    config_file = hf_folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: missing; stream_quantize reads a Hugging Face model folder")
    hf_config = AutoConfig.from_pretrained(hf_folder)
    arch = arch_for_model_type(hf_config.model_type)
    if arch.fused:
        raise ValueError(f"{hf_config.model_type}: fused projections; the builder's GPTQ loader reads Llama names")
    calibrated = isinstance(config, GPTQConfig | AWQConfig)  # layer inputs from the quantized layers before
    method = "AWQ" if isinstance(config, AWQConfig) else "GPTQ"
    if calibrated and not calibration:
        raise ValueError(f"streamed {method} needs calibration batches; got none")
    if calibrated and arch.sliding_window_layers:
        raise ValueError(
            f"{hf_config.model_type}: layers take different arguments (sliding-window and global attention); "
            f"streamed {method} passes every layer layer 0's, so it is for the other architectures"
        )
    if activation_dtype not in get_args(ActivationDtype):
        raise ValueError(f"activation_dtype = {activation_dtype!r}; allowed: {', '.join(get_args(ActivationDtype))}")
    if activation_dtype != "float32" and not calibrated:
        raise ValueError(f"activation_dtype = {activation_dtype}: RTN keeps no activations; it is for GPTQ / AWQ")
    keep = getattr(torch, activation_dtype)
    skeleton = meta_skeleton(hf_config)
    ckpt = Checkpoint(hf_folder)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp-*"):  # half-written files of a killed run
        stale.unlink()
    base = {
        "version": STREAM_VERSION,
        "quant": config.model_dump(mode="json"),
        "config": sha256_file(config_file),
        "calibration": _calibration_digest(calibration) if calibrated else None,
    }
    if activation_dtype != "float32":  # added later: the keys of files made before it stay as they were
        base["activations"] = activation_dtype
    layers = skeleton.get_submodule(arch.layers)
    keys, key = [], None
    for i in range(len(layers)):
        names = ckpt.names(f"{arch.layers}.{i}.")
        if not names:
            raise ValueError(f"{hf_folder}: no tensor of decoder layer {i} ({arch.layers}.{i}.*)")
        # GPTQ / AWQ: a layer's inputs come from every layer before it, so its key chains on theirs
        key = sha256_json({**base, "layer": i, "names": names, "source": ckpt.stamp(names), "after": key})
        keys.append(key)
    paths = [out / f"layer-{i:05d}.safetensors" for i in range(len(layers))]
    resume = _gptq_resume_point(out, paths, keys) if calibrated else None
    timings, hidden, calls, unscaled = [], None, [], []
    for i, (path, key) in enumerate(zip(paths, keys, strict=True)):
        t0 = time.perf_counter()
        prefix = f"{arch.layers}.{i}."
        reused = i < resume if calibrated else _finished(path, key)
        if reused and calibrated:
            unscaled += json.loads(path.with_suffix(".json").read_text()).get("awq_unscaled", [])
        elif calibrated:
            if hidden is None:  # the first layer done here: inputs from the embeddings, or kept on disk
                hidden, calls = capture_layer0(skeleton, arch, ckpt, hf_config, calibration)
                hidden = [_kept(h, keep, "decoder layer 0 inputs") for h in hidden]
                if i > 0:
                    hidden = _load_hidden(out / HIDDEN_FILE, len(hidden))
            tensors, hidden, skipped = _calibrated_layer(ckpt, layers[i], prefix, arch, config, hidden, calls, keep)
            for message in skipped:
                say(f"AWQ scale group left unscaled: {message}")
            unscaled += skipped
            _save_verified(tensors, path, key, {"layer": i, **({"awq_unscaled": skipped} if method == "AWQ" else {})})
            _save_verified({f"h{j}": h for j, h in enumerate(hidden)}, out / HIDDEN_FILE, key, {"after_layer": i})
            del tensors
        elif not reused:
            tensors = quantize_layer(ckpt, layer_linears(skeleton, arch, i), prefix, config)
            _save_verified(tensors, path, key, {"layer": i})
            del tensors
        seconds = time.perf_counter() - t0
        timings.append(LayerTiming(i, seconds, reused, high_water_mb()))
        say(f"layer {i + 1}/{len(layers)}: {'verified, reused' if reused else 'quantized'} in {seconds:.2f} s")
        if on_layer is not None:
            on_layer(timings[-1])
    (out / HIDDEN_FILE).unlink(missing_ok=True)
    (out / HIDDEN_FILE).with_suffix(".json").unlink(missing_ok=True)

    t0 = time.perf_counter()
    rest = [n for n in ckpt.where if not n.startswith(f"{arch.layers}.")]
    head_src = f"{arch.lm_head}.weight" if f"{arch.lm_head}.weight" in ckpt.where else f"{arch.embed}.weight"
    key = sha256_json({**base, "rest": sorted(rest), "lm_head": lm_head, "source": ckpt.stamp(rest)})
    path = out / REST_FILE
    head_reused = _finished(path, key)
    if not head_reused:
        tensors = ckpt.read(rest)
        if lm_head == "int4":
            head = tensors.pop(head_src)
            if not head_src.startswith(arch.lm_head) and not hf_config.tie_word_embeddings:
                tensors[head_src] = head  # an untied embedding keeps its own float table
            # tied: no float table is written; the builder's shared embedding (GatherBlockQuantized) reads the
            # head's 4-bit codes, and the graph is the same as with the table (tests/quant/test_streamed.py)
            tensors.update(gptq_head_tensors(arch.lm_head, head, config))
            del head
        _save_verified(tensors, path, key, {"part": "embedding, final norm, head"})
        del tensors
    head_seconds = time.perf_counter() - t0
    say(f"embedding / norm / head ({lm_head}) in {head_seconds:.2f} s")
    if on_layer is not None:
        on_layer(LayerTiming(len(layers), head_seconds, head_reused, high_water_mb(), head=True))
    _write_config(hf_folder, out, hf_config, config)
    return StreamResult(out, tuple(timings), head_seconds, tuple(unscaled))


def _write_config(hf_folder: Path, out: Path, hf_config: Any, config: WeightQuantConfig) -> None:
    """config.json with the GPTQ quantization_config the builder reads, the tokenizer files, and a stand-in
    tokenizer when the source has none (the builder copies one into genai_config's folder; ids only)."""
    import shutil

    cfg = json.loads((hf_folder / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": config.group_size,
        "desc_act": False,
        "sym": config.symmetric,
        "checkpoint_format": "gptq",
    }
    files = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    for name in files:
        if (hf_folder / name).exists():
            shutil.copy2(hf_folder / name, out / name)
    if not (hf_folder / "tokenizer.json").exists() and not (out / "tokenizer.json").exists():
        placeholder_tokenizer(hf_config.vocab_size).save_pretrained(out)
        cfg["compress_tokenizer"] = "placeholder: the source folder has no tokenizer (token ids only)"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def placeholder_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer whose tokens are `<id_N>`: lets the builder write its genai_config for a model
    without a tokenizer (scripts/make_shapes.py folders); it is not a real vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<id_{i}>": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<id_0>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<id_0>", eos_token="<id_1>", pad_token="<id_0>")


def read_quantized(folder: str | Path) -> Iterator[tuple[str, QuantizedWeight]]:
    """The QuantizedWeights of a streamed folder (for tests and checks), one layer file at a time."""
    from safetensors.torch import load_file

    from compress.quant.primitives.packing import GPTQTensors, unpack_gptq

    cfg = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors = load_file(str(f))
        for name in sorted(n.removesuffix(".qweight") for n in tensors if n.endswith(".qweight")):
            t = GPTQTensors(*(tensors[f"{name}.{part}"].numpy() for part in ("qweight", "qzeros", "scales", "g_idx")))
            qw = unpack_gptq(t, cfg["group_size"], cfg["sym"], "gptq_v2")
            yield name, shift_zero_points(qw, 1)


def build_streamed_decoder(
    folder: str | Path,
    out_dir: str | Path,
    *,
    lm_head: HeadMode = "float",
    accuracy_level: int | None = None,
    execution_provider: Literal["cpu", "cuda"] = "cpu",
    prune_lm_head: bool = False,
    verbose: bool = False,
    say: Say | None = None,
) -> Path:
    """onnxruntime-genai's fused INT4 decoder from a `stream_quantize` folder, written one layer at a time
    (`compress.genai.layered`: the builder on a 2-layer copy gives the pattern and converts nothing else)."""
    from compress.genai.layered import build_layered_decoder

    return build_layered_decoder(
        folder,
        out_dir,
        lm_head="int4" if lm_head == "int4" else "float",
        accuracy_level=accuracy_level,
        execution_provider=execution_provider,
        prune_lm_head=prune_lm_head,
        verbose=verbose,
        say=say,
    )
