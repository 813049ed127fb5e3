"""onnxruntime-genai's fused decoder graph for a layer-streamed checkpoint, written one decoder layer at a time.

    build_layered_decoder("work/gptq", "work/onnx", lm_head="int4")  # a compress.quant.streamed folder

Why: the model builder holds the whole model while it converts it (its GPTQ loader unpacks and repacks every
layer, then ``save_model`` turns the whole graph into one protobuf): 11 GB on a 3B shape, more than this machine
has for an 8B one (README, "Large models"). Every decoder layer of a Llama-style model is the same subgraph, so:

1. **Patterns**: the builder runs on two small copies of the folder: 2 layers (its config with
   ``num_hidden_layers: 2``, the first two layer files linked, not copied) and a vocabulary of 64, resp. 72,
   tokens (the first rows of the embedding and head). Each graph has the nodes before the layers (attention-mask
   subgraph, embedding), layer 0, layer 1, then the final norm and the head. What differs between the two graphs
   is what depends on the vocabulary size (shapes, a Reshape constant and its name, the head's ``N``): every such
   number is k * the vocabulary and is rewritten for the model's own (`vocabulary_graph`); any other difference
   is refused.
2. **Graph**: layer 1's nodes are replicated for layers 1..N-1, their tensor names renamed by layer index
   (``/model/layers.1/`` → ``.i/``, ``model.layers.1.`` → ``.i.``, ``past_key_values.1.`` / ``present.1.`` → ``.i.``;
   a reference to layer 0 → ``i-1``), the final norm's ``layers.2`` → ``layers.N``; graph inputs, outputs and
   value infos likewise. The proto holds names and external-data offsets only.
3. **Data**: ``model.onnx.data`` is written sequentially (page-aligned tensors, `compress.onnx_files`): each
   layer's initializers converted from its layer file (`layer_initializers`: the builder's own GPTQ loader
   methods, one Linear at a time, q/k/v packed as its ``make_packed_matmul_int4_class`` does, cast to the
   pattern's dtype), appended, and freed; the head and embedding converted the same way in blocks of
   `HEAD_BLOCK` rows (`_VocabSource`); the rotary caches and final norm copied from the pattern. So one layer,
   or one block of the head, is in memory at a time.

Checked on every build: our conversion must give the builder's own bytes where the pattern has them (layers 0
and 1, the first 64 rows of the head and embedding), and every layer's tensors the pattern's names, dtypes and
shapes; otherwise a ValueError names the tensor (an architecture whose layers the builder converts differently is
refused, never written wrong). On the tiny Llama the written graph equals the builder's full graph: same
initializers byte for byte, same logits (tests/genai/test_layered.py). genai_config.json is the pattern's with the
model's ``num_hidden_layers`` and ``vocab_size``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

#: Builder initializer prefix (a projection's name in the graph) -> the checkpoint Linears it is made of, in
#: order (Llama names, the ones the builder's GPTQ loader reads; a packed qkv concatenates along N).
PROJECTIONS: dict[str, tuple[str, ...]] = {
    "attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.q_proj": ("self_attn.q_proj",),
    "attn.k_proj": ("self_attn.k_proj",),
    "attn.v_proj": ("self_attn.v_proj",),
    "attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_proj": ("mlp.gate_proj",),
    "mlp.up_proj": ("mlp.up_proj",),
    "mlp.down_proj": ("mlp.down_proj",),
}
PATTERN_LAYERS = 2
#: vocabulary sizes of the two patterns (multiples of 8: GPTQ qzeros pack 8 outputs per int32); what differs
#: between their graphs is what depends on the vocabulary, rewritten for the model's own
PATTERN_VOCABS = (64, 72)
REST_FILE = "rest.safetensors"  # compress.quant.streamed's embedding / final norm / head file
VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")  # [vocab, hidden]
VOCAB_COLUMNS = {"lm_head.qweight": 1, "lm_head.scales": 1, "lm_head.qzeros": 8}  # [.., vocab / n]
HEAD_BLOCK = 8192  # vocabulary rows converted at once (a multiple of 8)
HIDDEN_BLOCK = 512  # rows of a transposed float head [hidden, vocab] written at once
Say = Callable[[str], None]


def _layer_files(folder: Path, n: int) -> list[Path]:
    paths = [folder / f"layer-{i:05d}.safetensors" for i in range(n)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {missing[:3]}; write the folder with stream_quantize first")
    return paths


def _pattern_source(folder: Path, work: Path, vocab: int) -> Path:
    """A 2-layer, `vocab`-token copy of the streamed folder: its config with 2 layers and `vocab` tokens, its first
    two layer files linked (no bytes copied), and the first `vocab` rows of its embedding / head."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = work / f"pattern-src-{vocab}"
    src.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config.update(num_hidden_layers=PATTERN_LAYERS, vocab_size=vocab)
    (src / "config.json").write_text(json.dumps(config, indent=2))
    keep = {f"layer-{i:05d}.safetensors" for i in range(PATTERN_LAYERS)}
    for path in folder.iterdir():
        if path.name in ("config.json", REST_FILE) or (path.name.startswith("layer-") and path.name not in keep):
            continue
        if path.suffix in (".safetensors", ".json", ".txt", ".model"):
            os.symlink(path.resolve(), src / path.name)
    rest: dict[str, torch.Tensor] = {}
    with safe_open(str(folder / REST_FILE), framework="pt") as fh:
        for name in fh.keys():  # noqa: SIM118 - not a dict
            t = fh.get_slice(name)
            if name in VOCAB_ROWS:
                rest[name] = t[:vocab]
            elif name in VOCAB_COLUMNS:  # GPTQ head tensors: [.., N] (qzeros pack 8 outputs per int32)
                rest[name] = t[:, : vocab // VOCAB_COLUMNS[name]]
            else:
                rest[name] = t[:]
    save_file({k: v.contiguous() for k, v in rest.items()}, str(src / REST_FILE), metadata={"format": "pt"})
    return src


def _builder_loader() -> Any:
    """The builder's GPTQ loader class, used for its conversion methods only (no checkpoint is read here)."""
    from onnxruntime_genai.models.loaders.gptq import GPTQModel

    return GPTQModel.__new__(GPTQModel)  # its unpack / repack methods read only the module they are given


def _repack(loader: Any, tensors: dict[str, torch.Tensor], name: str, bits: int, group_size: int) -> Any:
    """One Linear's GPTQ tensors in ONNX Runtime's MatMulNBits layout, by the builder's loader (as it does on load:
    properties, zero-point shift, unpack, dequantize to fp16, requantize, pack; g_idx dropped, desc_act false)."""
    from onnxruntime_genai.models.loaders.base import QuantizedTensorModule

    module = QuantizedTensorModule()
    for part in ("qweight", "qzeros", "scales", "g_idx"):
        setattr(module, part, tensors[f"{name}.{part}"])
    module.bits, module.group_size = bits, group_size
    loader.set_quantized_tensor_properties(module)
    loader.repack_quantized_tensor(module, clear_g_idx=True)
    return module


def layer_initializers(
    path: Path, index: int, specs: dict[str, tuple[int, list[int]]], bits: int, group_size: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """The builder's initializers of decoder layer `index`, from its streamed layer file, in `specs` order.

    `specs`: {initializer name: (ONNX data type, dims)} of this layer, as the pattern has them (renamed).
    """
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    loader, prefix, packed = _builder_loader(), f"model.layers.{index}.", {}
    for name, (data_type, dims) in specs.items():
        rest = name.removeprefix(prefix)
        projection, _, part = rest.rpartition(".MatMulNBits.")
        if projection:
            if projection not in PROJECTIONS or part not in ("qweight", "scales", "qzeros"):
                raise ValueError(f"{name}: the layer writer has no source for this builder tensor (PROJECTIONS)")
            if projection not in packed:
                modules = [_repack(loader, tensors, prefix + m, bits, group_size) for m in PROJECTIONS[projection]]
                packed = {projection: modules}  # one projection's modules at a time
            value = torch.cat([getattr(m, part) for m in packed[projection]], dim=0)  # along N, the builder's order
        elif prefix + rest in tensors:
            value = tensors[prefix + rest]  # norms: cast below, as the builder's make_initializer(..., to=io_dtype)
        else:
            raise ValueError(f"{name}: no tensor {prefix + rest} in {path}")
        value = value.to(_torch_dtype(data_type))
        if list(value.shape) != dims:
            raise ValueError(f"{name}: shape {list(value.shape)} from {path.name}, the builder's pattern has {dims}")
        yield name, value


def _torch_dtype(data_type: int) -> torch.dtype:
    import onnx

    table = {
        onnx.TensorProto.FLOAT: torch.float32,
        onnx.TensorProto.FLOAT16: torch.float16,
        onnx.TensorProto.BFLOAT16: torch.bfloat16,
        onnx.TensorProto.UINT8: torch.uint8,
        onnx.TensorProto.INT32: torch.int32,
        onnx.TensorProto.INT64: torch.int64,
    }
    if data_type not in table:
        raise ValueError(f"ONNX data type {data_type}: not one the layer writer converts")
    return table[data_type]


def _renamer(mapping: dict[int, int]) -> Callable[[str], str]:
    """Rename the layer indices of a builder tensor / node name by `mapping` (old index -> new index)."""
    pattern = re.compile(r"(/model/layers\.|model\.layers\.|past_key_values\.|present\.)(\d+)([./])")

    def rename(s: str) -> str:
        return pattern.sub(lambda m: f"{m[1]}{mapping.get(int(m[2]), int(m[2]))}{m[3]}", s)

    return rename


def _layer_of(name: str) -> int | None:
    m = re.match(r"(?:/model/layers\.|model\.layers\.|past_key_values\.|present\.)(\d+)[./]", name)
    return int(m[1]) if m else None


def _renamed_node(node: Any, rename: Callable[[str], str]) -> Any:
    import onnx

    out = onnx.NodeProto()
    out.CopyFrom(node)
    out.name = rename(node.name)
    out.input[:] = [rename(x) for x in node.input]
    out.output[:] = [rename(x) for x in node.output]
    return out


def _replicated(items: list[Any], n: int, key: Callable[[Any], str], copy: Callable[[Any, Callable], Any]) -> list:
    """`items` (pattern order) for `n` layers: layer-1 items repeated for layers 1..n-1, the final ones (layer 2,
    the final norm) moved to layer n; items of no layer and of layer 0 kept as they are."""
    first = next((j for j, it in enumerate(items) if _layer_of(key(it)) == 1), None)
    if first is None:
        raise ValueError("the builder's 2-layer pattern has no layer-1 node or tensor")
    last = max(j for j, it in enumerate(items) if _layer_of(key(it)) == 1)
    head, body, tail = items[:first], items[first : last + 1], items[last + 1 :]
    stray = [key(it) for it in body if _layer_of(key(it)) not in (1, None)]
    if stray:
        raise ValueError(f"the builder's pattern interleaves layer 1 with {stray[:3]}: not a layer-by-layer graph")
    out = list(head)
    for i in range(1, n):
        rename = _renamer({0: i - 1, 1: i})
        out += [copy(it, rename) for it in body if i == 1 or _layer_of(key(it)) == 1]
    final = _renamer({1: n - 1, 2: n})
    return out + [copy(it, final) for it in tail]


def _graph_io(items: list[Any], n: int) -> list[Any]:
    """Graph inputs / outputs / value infos for n layers: each `*.1.*` entry repeated for layers 1..n-1 at its place,
    `*.2.*` entries (the final norm) renamed to n."""
    import onnx

    out = []
    for item in items:
        layer = _layer_of(item.name)
        indices = range(1, n) if layer == 1 else [n] if layer == PATTERN_LAYERS else [None]
        for i in indices:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(item)
            if i is not None:
                copy.name = _renamer({layer: i})(item.name)
            out.append(copy)
    return out


class _DataWriter:
    """Appends initializer bytes to one external data file (`compress.onnx_files`' layout: page-aligned tensors)
    and returns the TensorProtos that point at them."""

    def __init__(self, path: Path) -> None:
        self.location, self.handle = path.name, path.open("wb")

    def tensor(self, name: str, data_type: int, dims: list[int], value: torch.Tensor) -> Any:
        import onnx

        from compress.onnx_files import append_external

        proto = onnx.TensorProto(name=name, data_type=data_type, dims=dims)
        append_external(self.handle, proto, memoryview(value.contiguous().view(torch.uint8).numpy()), self.location)
        return proto

    def tensors(self, name: str, data_type: int, dims: list[int], blocks: Iterator[torch.Tensor]) -> Any:
        """One tensor written from consecutive blocks along its first axis (never whole in memory)."""
        import onnx

        from compress.onnx_files import append_external

        proto = onnx.TensorProto(name=name, data_type=data_type, dims=dims)
        first = None
        for block in blocks:
            data = memoryview(block.contiguous().view(torch.uint8).numpy())
            if first is None:
                append_external(self.handle, proto, data, self.location)
                first = int(next(e.value for e in proto.external_data if e.key == "offset"))
            else:
                self.handle.write(data)
        length = self.handle.tell() - first
        want = int(torch.Size(dims).numel()) * torch.empty(0, dtype=_torch_dtype(data_type)).element_size()
        if length != want:
            raise ValueError(f"{name}: {length} bytes written, its shape {dims} holds {want}")
        next(e for e in proto.external_data if e.key == "length").value = str(length)
        return proto

    def copy(self, init: Any, pattern: Path) -> Any:
        """`init`, an external tensor of the graph `pattern`, with its bytes copied in chunks."""
        import onnx

        from compress.onnx_files import copy_external

        proto = onnx.TensorProto()
        proto.CopyFrom(init)
        copy_external(pattern, proto, self.handle, self.location)
        return proto

    def close(self) -> None:
        self.handle.close()


class _VocabSource:
    """The builder's vocabulary-sized tensors (head, embedding) for any block of rows, from the streamed folder's
    embedding / head file: the head's GPTQ tensors repacked by the builder's loader methods (rows are independent:
    the MatMulNBits layout is [N, ..] and its scales / zero points are flattened N-major), float tables cast."""

    def __init__(self, folder: Path, bits: int, group_size: int) -> None:
        from safetensors import safe_open

        self.file = safe_open(str(folder / REST_FILE), framework="pt")
        self.names = set(self.file.keys())  # noqa: SIM118 - not a dict
        self.bits, self.group_size, self.loader = bits, group_size, _builder_loader()
        self.kept: dict[str, list[torch.Tensor]] = {}  # head parts converted with another part, not written yet

    def float_table(self) -> str:
        return "lm_head.weight" if "lm_head.weight" in self.names else "model.embed_tokens.weight"

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the builder's `name` (its vocabulary axis first; flattened: the rows' elements)."""
        if name.startswith("lm_head.MatMulNBits."):
            return getattr(self._head(start, stop), name.rsplit(".", 1)[1])
        if name == "model.embed_tokens.weight":
            return self.file.get_slice(name)[start:stop]
        if name == "lm_head.MatMul.weight":  # [hidden, vocab]: the float head transposed
            return self.file.get_slice(self.float_table())[start:stop].T
        raise ValueError(f"{name}: a vocabulary-sized builder tensor the layer writer has no source for")

    def _head(self, start: int, stop: int) -> Any:
        """The head's rows [start, stop) repacked (qweight, scales, qzeros of the MatMulNBits layout)."""
        tensors = {
            f"lm_head.{p}": self.file.get_slice(f"lm_head.{p}")[:, start // n : stop // n]
            for p, n in (("qweight", 1), ("scales", 1), ("qzeros", 8))
        }
        tensors["lm_head.g_idx"] = self.file.get_slice("lm_head.g_idx")[:]
        return _repack(self.loader, tensors, "lm_head", self.bits, self.group_size)

    def _head_blocks(self, name: str, vocab: int) -> Iterator[torch.Tensor]:
        """One head part in blocks; each block is converted once: the other parts' blocks are kept for their turn
        (scales and zero points are 1/8 and 1/64 of the codes' bytes)."""
        if name in self.kept:
            yield from self.kept.pop(name)
            return
        for i in range(0, vocab, HEAD_BLOCK):
            module = self._head(i, min(i + HEAD_BLOCK, vocab))
            for part in ("qweight", "scales", "qzeros"):
                if f"lm_head.MatMulNBits.{part}" != name:
                    self.kept.setdefault(f"lm_head.MatMulNBits.{part}", []).append(getattr(module, part))
            yield getattr(module, name.rsplit(".", 1)[1])

    def write(self, writer: _DataWriter, name: str, data_type: int, dims: list[int], vocab: int) -> Any:
        """The whole tensor (`dims`: the model's), written in blocks of rows along its first axis."""
        dtype = _torch_dtype(data_type)
        if name == "lm_head.MatMul.weight":  # vocabulary on axis 1: blocks of hidden rows, each of the whole vocab
            table = self.file.get_slice(self.float_table())
            blocks = (table[:, h : h + HIDDEN_BLOCK].T for h in range(0, dims[0], HIDDEN_BLOCK))
        elif name.startswith("lm_head.MatMulNBits."):
            blocks = self._head_blocks(name, vocab)
        else:
            blocks = (self.rows(name, i, min(i + HEAD_BLOCK, vocab)) for i in range(0, vocab, HEAD_BLOCK))
        return writer.tensors(name, data_type, dims, (b.to(dtype) for b in blocks))


def _int64_as_fields(model: Any, back: bool) -> None:
    """INT64 constants and inline initializers as int64_data (so that their values read as numbers in the text
    form), or `back` to raw_data, the builder's form."""
    import numpy as np
    import onnx

    tensors = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.HasField("t")]
    for t in (t for t in tensors if t.data_type == onnx.TensorProto.INT64):
        if back and t.int64_data:
            t.raw_data = np.array(t.int64_data, np.int64).tobytes()
            t.ClearField("int64_data")
        elif not back and t.HasField("raw_data"):
            t.int64_data.extend(np.frombuffer(t.raw_data, np.int64).tolist())
            t.ClearField("raw_data")


def vocabulary_graph(a: Any, b: Any, vocabs: tuple[int, int], vocab: int) -> Any:
    """The graph of pattern `a` (vocabulary `vocabs[0]`) for `vocab` tokens: every number where `a` and pattern `b`
    (`vocabs[1]`) differ is k * the vocabulary (a shape, a name like ``/model/constants/INT64/[64, 32]``, an
    attribute ``N``), and becomes k * `vocab`. Any other difference is refused. External initializers are left out
    (their offsets differ; they are written separately)."""
    import onnx
    from google.protobuf import text_format

    texts = []
    for m in (a, b):
        copy = onnx.ModelProto()
        copy.CopyFrom(m)
        keep = [t for t in copy.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        del copy.graph.initializer[:]
        copy.graph.initializer.extend(keep)
        _int64_as_fields(copy, back=False)
        texts.append(text_format.MessageToString(copy).splitlines())
    if len(texts[0]) != len(texts[1]):
        raise ValueError("the builder's graph changes with the vocabulary size beyond its shapes: not replicable")
    v0, v1 = vocabs
    lines = []
    for x, y in zip(*texts, strict=True):
        if x == y:
            lines.append(x)
            continue
        tx, ty = re.split(r"(\d+)", x), re.split(r"(\d+)", y)
        merged = []
        for j, (p, q) in enumerate(zip(tx, ty, strict=False)):
            if p == q:
                merged.append(p)
            elif j % 2 and int(p) % v0 == 0 and int(p) // v0 == int(q) // v1 and int(q) % v1 == 0:
                merged.append(str(int(p) // v0 * vocab))
            else:
                raise ValueError(f"the builder's graph differs with the vocabulary size here: {x.strip()!r}")
        if len(tx) != len(ty):
            raise ValueError(f"the builder's graph differs with the vocabulary size here: {x.strip()!r}")
        lines.append("".join(merged))
    out = text_format.Parse("\n".join(lines), onnx.ModelProto())
    _int64_as_fields(out, back=True)
    return out


def _check_pattern(written: dict[str, torch.Tensor], pattern: dict[str, Any], data_dir: Path) -> None:
    """Our conversion must give the builder's own bytes where the pattern has them (layers 0, 1; the first rows
    of the head and embedding)."""
    from onnx import numpy_helper

    for name, value in written.items():
        want = numpy_helper.to_array(pattern[name], base_dir=str(data_dir))
        got = value.numpy()
        if want.dtype != got.dtype or want.shape != got.shape or want.tobytes() != got.tobytes():
            raise ValueError(
                f"{name}: the layer writer's bytes differ from the builder's pattern (this architecture's layers "
                "are converted differently by the builder; build it with compress.genai.build.build_fused_decoder)"
            )


def write_layered_graph(folder: Path, patterns: tuple[Path, Path], out_dir: Path, say: Say) -> None:
    """Write `out_dir/model.onnx` (+ `.data`) for every layer and the whole vocabulary of `folder` from the two
    2-layer patterns (vocabularies `PATTERN_VOCABS`)."""
    import onnx

    config = json.loads((folder / "config.json").read_text())
    n, vocab, q = int(config["num_hidden_layers"]), int(config["vocab_size"]), config["quantization_config"]
    if vocab % 8:
        raise ValueError(f"{folder}/config.json: vocab_size = {vocab}; the GPTQ head packs 8 rows per int32")
    pattern_path = patterns[0] / "model.onnx"
    a, b = (onnx.load(str(d / "model.onnx"), load_external_data=False) for d in patterns)
    graph = vocabulary_graph(a, b, PATTERN_VOCABS, vocab).graph
    inits = list(a.graph.initializer)
    by_name = {t.name: t for t in inits}
    inline = {t.name: t for t in graph.initializer}
    other_dims = {t.name: list(t.dims) for t in b.graph.initializer}
    # layer 0's tensors as the pattern has them (its first norm differs in kind), every later one as layer 1's
    layer_specs = [{t.name: (t.data_type, list(t.dims)) for t in inits if _layer_of(t.name) == k} for k in (0, 1)]
    paths = _layer_files(folder, n)
    source = _VocabSource(folder, q["bits"], q["group_size"])

    model = onnx.ModelProto()
    model.CopyFrom(a)
    del model.graph.node[:], model.graph.initializer[:], model.graph.input[:], model.graph.output[:]
    del model.graph.value_info[:]
    model.graph.node.extend(_replicated(list(graph.node), n, lambda x: x.name, _renamed_node))
    model.graph.input.extend(_graph_io(list(graph.input), n))
    model.graph.output.extend(_graph_io(list(graph.output), n))
    model.graph.value_info.extend(_graph_io(list(graph.value_info), n))

    out_dir.mkdir(parents=True)
    writer = _DataWriter(out_dir / "model.onnx.data")
    written: list[Any] = []
    first_layer_tensor = next(t.name for t in inits if _layer_of(t.name) == 0)
    try:
        for t in inits:  # pattern order; layer 0 and 1 tensors come from the layer files
            layer = _layer_of(t.name)
            if layer in (0, 1):
                if t.name != first_layer_tensor:
                    continue
                for i in range(n):  # at the place of layer 0's first tensor: every layer, in order
                    specs = {_renamer({1: i})(k): v for k, v in layer_specs[min(i, 1)].items()}
                    values = dict(layer_initializers(paths[i], i, specs, q["bits"], q["group_size"]))
                    if i < PATTERN_LAYERS:
                        _check_pattern(values, by_name, patterns[0])
                    written += [writer.tensor(k, *specs[k], v) for k, v in values.items()]
                    del values
                    say(f"layer {i + 1}/{n} written")
            elif t.data_location != onnx.TensorProto.EXTERNAL:
                written.append(inline[t.name])  # vocabulary-dependent values already rewritten
            elif list(t.dims) != other_dims[t.name]:  # sized by the vocabulary: the head, the embedding
                axis = next(j for j, (x, y) in enumerate(zip(t.dims, other_dims[t.name], strict=True)) if x != y)
                dims = [d // PATTERN_VOCABS[0] * vocab if j == axis else d for j, d in enumerate(t.dims)]
                first = source.rows(t.name, 0, PATTERN_VOCABS[0]).to(_torch_dtype(t.data_type))
                _check_pattern({t.name: first}, by_name, patterns[0])  # the pattern's rows are the model's first
                written.append(source.write(writer, t.name, t.data_type, dims, vocab))
                say(f"{t.name} written")
            else:
                copied = writer.copy(t, pattern_path)
                copied.name = _renamer({PATTERN_LAYERS: n})(t.name)
                written.append(copied)
    finally:
        writer.close()
    model.graph.initializer.extend(written)
    onnx.save(model, str(out_dir / "model.onnx"))


def build_layered_decoder(
    folder: str | Path,
    out_dir: str | Path,
    *,
    lm_head: str = "float",
    accuracy_level: int | None = None,
    execution_provider: str = "cpu",
    prune_lm_head: bool = False,
    verbose: bool = False,
    say: Say | None = None,
) -> Path:
    """The builder's fused INT4 graph of a `compress.quant.streamed` folder, one decoder layer in memory at a time
    (module docstring). A folder of at most 2 layers is its own pattern. `out_dir` appears only when complete."""
    from compress.genai.build import build_fused_decoder

    folder, out_dir = Path(folder), Path(out_dir)
    say = say or (lambda _m: None)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: exists; remove it or choose another output folder")
    config = json.loads((folder / "config.json").read_text())
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "gptq" or q.get("desc_act"):
        raise ValueError(
            f"{folder}/config.json: quantization_config = {q}; a stream_quantize folder (gptq, no act-order)"
        )
    n = int(config["num_hidden_layers"])
    options = {
        "precision": "int4",
        "execution_provider": execution_provider,
        "accuracy_level": accuracy_level,
        "block_size": q["group_size"],
        "symmetric": q["sym"],
        "lm_head": lm_head,
        "prune_lm_head": prune_lm_head,
        "verbose": verbose,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if n <= PATTERN_LAYERS:
            build_fused_decoder(folder, work / "model", **options)
        else:
            patterns = tuple(
                build_fused_decoder(_pattern_source(folder, work, v), work / f"pattern-{v}", **options)
                for v in PATTERN_VOCABS
            )
            say(f"builder patterns ({PATTERN_LAYERS} layers, {' and '.join(map(str, PATTERN_VOCABS))} tokens) written")
            write_layered_graph(folder, patterns, work / "model", say)
            genai = json.loads((patterns[0] / "genai_config.json").read_text())
            genai["model"]["decoder"]["num_hidden_layers"] = n
            genai["model"]["vocab_size"] = int(config["vocab_size"])
            (work / "model" / "genai_config.json").write_text(json.dumps(genai, indent=4))
            for path in patterns[0].iterdir():
                if path.name not in ("model.onnx", "model.onnx.data", "genai_config.json"):
                    shutil.copy2(path, work / "model" / path.name)
        os.replace(work / "model", out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir
