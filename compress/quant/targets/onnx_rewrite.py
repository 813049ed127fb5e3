"""Carry torch-side INT4 weights into an exported FP32 ONNX graph.

Exporters rename weights (TorchScript: ``onnx::MatMul_123``; dynamo: ``val_112``) and store a
Linear's weight pre-transposed as ``Wᵀ [in, out]``, so each Linear is found by *value*: a hash of
the float weight (as ``Wᵀ`` for ``MatMul(A, B)``/``Gemm(transB=0)``, as ``W`` for
``Gemm(transB=1)``, ``MatMul(A, Transpose(W))`` and an embedding ``Gather``). Pass the float weights
that are in the exported graph (after GPTQ/AWQ these are the dequantized weights, since those
functions leave them in the model).

Targets:
- ``onnxruntime`` (default): ``com.microsoft.MatMulNBits`` (ORT contrib op); its CPU kernel runs
  INT4 x FP32 (``accuracy_level`` 4 = int8 activations, fastest on AVX512-VNNI).
- ``tensorrt``: ``DequantizeLinear`` (opset 21, blocked, signed ``INT4``, no zero point) + the
  original ``MatMul``. Needs symmetric weights. Opset 21 is reached by *raising the opset import*
  of a graph exported at opset >= 18, never with ``onnx.version_converter`` (which rewrote a
  ReduceMean wrongly: ORT then refused "Unrecognized attribute: axes"): between 18 and 21 the
  standard ops changed only by new types,
  except the few listed in ``_CHANGED_AFTER_18``, which are refused. Graphs below opset 18 (where
  ReduceMean/Split changed signature) are refused with the advice to export at opset 21.

Optionally the embedding ``Gather`` becomes ``com.microsoft.GatherBlockQuantized`` (onnxruntime), or
``Gather(DequantizeLinear(INT4, axis=1))`` in standard ONNX (tensorrt). For onnxruntime, an embedding given
the very QuantizedWeight of a quantized Linear (a tied lm_head) reads that MatMulNBits' tensors through a
Reshape, so the codes are stored once.
Linears that cannot be matched are listed in the report, and ``strict=True`` (default) raises.
Unused float initializers are dropped so the file is really 4-bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from compress.errors import StageError
from compress.quant.primitives.packing import matmul_nbits_block_size, pack_dq_int4, pack_matmul_nbits, pack_nibbles
from compress.quant.primitives.weight import QuantizedWeight

Target = Literal["onnxruntime", "tensorrt"]
MS_DOMAIN = "com.microsoft"
_CHANGED_AFTER_18 = frozenset({"GridSample", "DFT"})  # signature/semantics changed in opsets 19-21


def float_weights_of(model: torch.nn.Module, names: Mapping[str, object] | list[str]) -> dict[str, torch.Tensor]:
    """``{name: module.weight}`` for the given module names (what ``quantize_onnx_weights`` matches on)."""
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach().clone() for n in names}


@dataclass
class RewriteReport:
    """What the rewrite did: which Linears became which node, what was left, sizes in bytes."""

    replaced: dict[str, list[str]] = field(default_factory=dict)  # linear name -> new node names
    unmatched: list[str] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)  # linear name -> why it was not replaced
    notes: dict[str, str] = field(default_factory=dict)  # replaced, but the float weight has other readers
    dropped_initializers: int = 0
    opset_raised_to: int | None = None
    size_before: int | None = None
    size_after: int | None = None

    def record(self, name: str, hits: list[str], reasons: list[str]) -> None:
        """File one weight's outcome: replaced (with notes on other readers), unsupported, or unmatched."""
        if hits:
            self.replaced[name] = hits
            if reasons:  # e.g. a tied embedding Gather: that float copy stays unless quantized as embedding
                self.notes[name] = "; ".join(reasons)
        elif reasons:
            self.unsupported[name] = "; ".join(reasons)
        else:
            self.unmatched.append(name)

    def summary(self) -> str:
        s = (
            f"{len(self.replaced)} Linear(s) quantized, {len(self.unmatched)} unmatched, "
            f"{len(self.unsupported)} unsupported"
        )
        if self.size_before and self.size_after:
            s += f"; {self.size_before / 1e6:.2f} MB -> {self.size_after / 1e6:.2f} MB"
        return s


def _key(arr: np.ndarray) -> str:
    a = np.ascontiguousarray(arr)
    return hashlib.sha256(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()


def _keys(t: torch.Tensor) -> set[str]:
    """Hashes of ``t`` as float32 and float16 (exports in either precision)."""
    a = t.detach().cpu().float().numpy()
    return {_key(a.astype(np.float32)), _key(a.astype(np.float16))}


def _opset(model: onnx.ModelProto, domain: str = "") -> int | None:
    for o in model.opset_import:
        if o.domain in (domain, "ai.onnx" if domain == "" else domain):
            return o.version
    return None


def _set_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    for o in model.opset_import:
        if o.domain == domain:
            o.version = max(o.version, version)
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def _permute_for_g_idx(qw: QuantizedWeight) -> tuple[QuantizedWeight, np.ndarray | None]:
    """Act-order weights: sort input columns by group so groups are contiguous; return the column order."""
    if qw.has_trivial_g_idx():
        return qw, None
    perm = torch.argsort(qw.g_idx.long(), stable=True)
    sorted_groups = qw.g_idx.long()[perm]
    g = qw.group_size
    if not torch.equal(sorted_groups, torch.arange(qw.shape[1]) // g):
        raise ValueError("g_idx groups are not of equal size group_size; cannot lay them out in blocks")
    permuted = QuantizedWeight(
        qweight=qw.qweight[:, perm].contiguous(),
        scales=qw.scales,
        zeros=qw.zeros,
        group_size=g,
        bits=qw.bits,
        symmetric=qw.symmetric,
    )
    return permuted, perm.numpy().astype(np.int64)


class _Graph:
    """Small helpers over a GraphProto: consumers, producers, initializers, fresh names."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self._n = 0

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return [n for n in self.g.node if name in n.input]

    def fresh(self, base: str) -> str:
        self._n += 1
        return f"{base}_q4_{self._n}"

    def add_init(self, base: str, arr: np.ndarray) -> str:
        name = self.fresh(base)
        self.g.initializer.append(numpy_helper.from_array(arr, name))
        return name

    def add_packed4(self, base: str, packed: np.ndarray, dims: list[int], signed: bool) -> str:
        name = self.fresh(base)
        t = helper.make_tensor(
            name, TensorProto.INT4 if signed else TensorProto.UINT4, dims, packed.tobytes(), raw=True
        )
        self.g.initializer.append(t)
        return name


def _matmulnbits_nodes(
    G: _Graph, a: str, out: str, qw: QuantizedWeight, base: str, accuracy_level: int | None
) -> list[onnx.NodeProto]:
    qw, perm = _permute_for_g_idx(qw)
    nodes: list[onnx.NodeProto] = []
    if perm is not None:
        pname = G.add_init(base + "_perm", perm)
        a_perm = G.fresh(base + "_A_perm")
        nodes.append(helper.make_node("Gather", [a, pname], [a_perm], name=G.fresh(base + "_Gather"), axis=-1))
        a = a_perm
    t = pack_matmul_nbits(qw)
    inputs = [a, G.add_init(base + "_B", t.B), G.add_init(base + "_scales", t.scales)]
    if t.zero_points is not None:
        inputs.append(G.add_init(base + "_zp", t.zero_points))
    attrs = {"K": t.K, "N": t.N, "bits": t.bits, "block_size": t.block_size}
    if accuracy_level is not None:
        attrs["accuracy_level"] = accuracy_level
    nodes.append(
        helper.make_node("MatMulNBits", inputs, [out], name=G.fresh(base + "_MatMulNBits"), domain=MS_DOMAIN, **attrs)
    )
    return nodes


def _dq_nodes(G: _Graph, qw: QuantizedWeight, base: str) -> tuple[list[onnx.NodeProto], str]:
    """DequantizeLinear producing ``Wᵀ [K, N]`` from blocked INT4; returns (nodes, output name)."""
    if not qw.symmetric:
        raise ValueError("target tensorrt needs symmetric INT4 weights (symmetric: true); got asymmetric")
    qw, perm = _permute_for_g_idx(qw)
    if perm is not None:
        raise ValueError("target tensorrt needs contiguous groups: use act_order with static_groups")
    t = pack_dq_int4(qw)
    x = G.add_packed4(base + "_w_int4", t.data, [t.K, t.N], signed=True)
    s = G.add_init(base + "_w_scale", t.scale)
    out = G.fresh(base + "_w_dq")
    node = helper.make_node(
        "DequantizeLinear", [x, s], [out], name=G.fresh(base + "_DQ"), axis=0, block_size=t.block_size
    )
    return [node], out


def _gather_block_quantized(G: _Graph, node: onnx.NodeProto, qw: QuantizedWeight, base: str) -> list[onnx.NodeProto]:
    """``Gather(E, ids)`` -> ``com.microsoft.GatherBlockQuantized`` (uint8 data, 4 or 8 bits, quantize_axis 1)."""
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    if axis != 0 or not qw.has_trivial_g_idx():
        raise ValueError("GatherBlockQuantized here needs gather axis 0 and contiguous groups")
    pack = pack_nibbles if qw.bits == 4 else np.asarray
    vocab, hidden = qw.shape
    bs = matmul_nbits_block_size(hidden, qw.group_size)  # per row: a power of two >= width, one block
    data = G.add_init(base + "_data", pack(qw.qweight.numpy()))  # (vocab, hidden*bits/8)
    scales = G.add_init(base + "_scales", qw.scales.float().numpy())  # (vocab, n_blocks)
    inputs = [data, node.input[1], scales]
    if not qw.symmetric:
        inputs.append(G.add_init(base + "_zp", pack(qw.zeros.numpy())))  # (vocab, ceil(n_blocks*bits/8))
    return [
        helper.make_node(
            "GatherBlockQuantized",
            inputs,
            list(node.output),
            name=G.fresh(base + "_GBQ"),
            domain=MS_DOMAIN,
            gather_axis=0,
            quantize_axis=1,
            block_size=bs,
            bits=qw.bits,
        )
    ]


def _shared_head(
    G: _Graph,
    new_nodes: Mapping[int, list[onnx.NodeProto]],
    quantized: Mapping[str, QuantizedWeight],
    qw: QuantizedWeight,
) -> onnx.NodeProto | None:
    """The MatMulNBits written for the Linear whose QuantizedWeight *is* ``qw`` (a tied head), if its
    codes can serve a gather as they are (no padding of K, contiguous groups); else None."""
    names = [n for n, q in quantized.items() if q is qw]
    if not names or not qw.has_trivial_g_idx():
        return None
    prefix = names[0].replace(".", "_") + "_MatMulNBits_q4_"
    for nodes in new_nodes.values():
        for node in nodes:
            if node.op_type == "MatMulNBits" and node.name.startswith(prefix):
                attrs = {a.name: a.i for a in node.attribute}
                return node if attrs["K"] % attrs["block_size"] == 0 else None
    return None


def _gather_from_head(G: _Graph, node: onnx.NodeProto, head: onnx.NodeProto, base: str) -> list[onnx.NodeProto]:
    """``Gather(E, ids)`` -> ``GatherBlockQuantized`` over the tied head's own MatMulNBits tensors (stored once).

    MatMulNBits keeps ``W (N=vocab, K=hidden)`` row by row in blocks along K, which is the embedding's
    row layout: ``B (V, n_blocks, blob)`` reshaped to ``(V, H*bits/8)``, scales / zero points to 2-D.
    """
    attrs = {a.name: a.i for a in head.attribute}
    n, k, bits, bs = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    nodes, inputs = [], []
    for slot, last in ((1, k * bits // 8), (2, -1), (3, -1)):
        if len(head.input) <= slot or not head.input[slot]:
            continue
        shape = G.add_init(base + "_shape", np.array([n, last], np.int64))
        out = G.fresh(base + "_2d")
        nodes.append(helper.make_node("Reshape", [head.input[slot], shape], [out], name=G.fresh(base + "_Reshape")))
        inputs.append(out)
    data, rest = inputs[0], inputs[1:]
    if bits == 8 and len(rest) == 1:  # symmetric: MatMulNBits' implicit 128, given explicitly to the gather
        rest.append(G.add_init(base + "_zp", np.full((n, k // bs), 128, np.uint8)))
    nodes.append(
        helper.make_node(
            "GatherBlockQuantized",
            [data, node.input[1], *rest],
            list(node.output),
            name=G.fresh(base + "_GBQ"),
            domain=MS_DOMAIN,
            gather_axis=0,
            quantize_axis=1,
            block_size=bs,
            bits=bits,
        )
    )
    return nodes


def _dq_gather(G: _Graph, node: onnx.NodeProto, qw: QuantizedWeight, base: str) -> list[onnx.NodeProto]:
    """``Gather(E, ids)`` -> ``Gather(DequantizeLinear(E_int4, axis=1, block_size), ids)`` (standard ONNX)."""
    if not qw.symmetric or qw.bits != 4 or not qw.has_trivial_g_idx():
        raise ValueError("target tensorrt embeddings need symmetric 4-bit weights with contiguous groups")
    vocab, hidden = qw.shape
    bs = hidden if qw.group_size == -1 else qw.group_size
    signed = (qw.qweight.numpy().astype(np.int16) - 8).astype(np.int8)  # (vocab, hidden) in [-8, 7]
    x = G.add_packed4(base + "_int4", pack_nibbles(signed.reshape(-1)), [vocab, hidden], signed=True)
    scale = G.add_init(base + "_scale", qw.scales.float().numpy())  # (vocab, n_groups)
    deq = G.fresh(base + "_dq")
    return [
        helper.make_node("DequantizeLinear", [x, scale], [deq], name=G.fresh(base + "_DQ"), axis=1, block_size=bs),
        helper.make_node("Gather", [deq, node.input[1]], list(node.output), name=G.fresh(base + "_Gather"), axis=0),
    ]


def _raise_opset_for_int4(model: onnx.ModelProto, report: RewriteReport) -> None:
    v = _opset(model) or 0
    if v >= 21:
        return
    if v < 18:
        raise ValueError(
            f"the graph is at opset {v}; INT4 DequantizeLinear needs opset 21 and ops changed signature "
            "at 18 (ReduceMean axes, Split): export the model at opset 21 "
            "(torch.onnx.export(..., opset_version=21))"
        )
    bad = sorted(
        {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx") and n.op_type in _CHANGED_AFTER_18}
    )
    if bad:
        raise ValueError(f"ops {bad} changed between opset {v} and 21; export the model at opset 21")
    _set_opset(model, "", 21)
    report.opset_raised_to = 21


def _used_names(graph: onnx.GraphProto) -> set[str]:
    used = {o.name for o in graph.output}
    for n in graph.node:
        used.update(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= _used_names(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    used |= _used_names(sg)
    return used


def _prune(model: onnx.ModelProto) -> int:
    """Drop nodes whose outputs nobody reads (iteratively) and unread initializers; count dropped inits."""
    g = model.graph
    while True:
        used = _used_names(g)
        dead = [n for n in g.node if n.output and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = _used_names(g)
    stale = [i for i in g.initializer if i.name not in used]
    for i in stale:
        g.initializer.remove(i)
    names = {i.name for i in stale}
    for inp in [i for i in g.input if i.name in names]:
        g.input.remove(inp)
    return len(stale)


def quantize_onnx_weights(
    model: onnx.ModelProto,
    quantized: Mapping[str, QuantizedWeight],
    float_weights: Mapping[str, torch.Tensor],
    *,
    target: Target = "onnxruntime",
    accuracy_level: int | None = None,
    embeddings: Mapping[str, QuantizedWeight] | None = None,
    strict: bool = True,
) -> tuple[onnx.ModelProto, RewriteReport]:
    """Replace the MatMul/Gemm of each quantized Linear (and optional embedding Gathers) in ``model``.

    ``quantized`` / ``embeddings`` map torch module names to QuantizedWeights; ``float_weights`` maps
    the same names to the float weights present in the exported graph. Returns a new model and a
    report; with ``strict`` any Linear not found raises StageError listing them.
    """
    if target not in ("onnxruntime", "tensorrt"):
        raise ValueError(f"target = {target!r}; allowed: onnxruntime, tensorrt")
    if accuracy_level is not None and accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level = {accuracy_level}; allowed: 0, 1, 2, 3, 4")
    embeddings = embeddings or {}
    missing = [n for n in [*quantized, *embeddings] if n not in float_weights]
    if missing:
        raise ValueError(f"no float weight given for {missing}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    report = RewriteReport()
    if target == "tensorrt":
        _raise_opset_for_int4(model, report)
    G = _Graph(model)
    matching = _weight_index(G)
    new_nodes: dict[int, list[onnx.NodeProto]] = {}  # index of replaced node -> replacement
    index = {id(n): i for i, n in enumerate(G.g.node)}
    for lname, qw in quantized.items():
        w = float_weights[lname]
        if tuple(w.shape) != qw.shape:
            raise ValueError(f"{lname}: float weight {tuple(w.shape)} vs quantized {qw.shape}")
        rewrite = _Int4MatMul(G, qw, lname.replace(".", "_"), target, accuracy_level)
        hits: list[str] = []
        reasons: list[str] = []
        for node, how in _weight_sites(G, matching, w):
            i = index[id(node)]
            if i in new_nodes:
                continue
            nodes, reason = rewrite.replace(node, how)
            if nodes is not None:
                new_nodes[i] = nodes
                hits.append(node.name or node.output[0])
            elif reason:
                reasons.append(reason)
        report.record(lname, hits, reasons)
    for ename, qw in embeddings.items():
        hits = []
        head = _shared_head(G, new_nodes, quantized, qw) if target == "onnxruntime" else None
        for iname in matching(float_weights[ename]):
            for node in G.consumers(iname):
                if node.op_type == "Gather" and node.input[0] == iname:
                    base = ename.replace(".", "_")
                    if head is not None:  # a tied table: read the head's codes, stored once
                        new_nodes[index[id(node)]] = _gather_from_head(G, node, head, base)
                    else:
                        make = _gather_block_quantized if target == "onnxruntime" else _dq_gather
                        new_nodes[index[id(node)]] = make(G, node, qw, base)
                    hits.append(node.name or node.output[0])
        report.record(ename, hits, [])
    if strict and (report.unmatched or report.unsupported):
        raise StageError(
            f"INT4 rewrite could not place {len(report.unmatched) + len(report.unsupported)} weight(s): "
            f"unmatched {report.unmatched}, unsupported {report.unsupported}"
        )
    _splice(G, new_nodes)
    if target == "onnxruntime":
        _set_opset(model, MS_DOMAIN, 1)
    report.dropped_initializers = _prune(model)
    return model, report


def _weight_index(G: _Graph) -> Callable[[torch.Tensor], list[str]]:
    """A lookup: the names of the graph's 2-D float initializers equal to a tensor (by content hash)."""
    by_key: dict[str, list[str]] = {}
    for name, init in G.inits.items():
        if init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and len(init.dims) == 2:
            by_key.setdefault(_key(numpy_helper.to_array(init)), []).append(name)

    def matching(t: torch.Tensor) -> list[str]:
        return sorted({n for k in _keys(t) for n in by_key.get(k, [])})

    return matching


def _weight_sites(
    G: _Graph, matching: Callable[[torch.Tensor], list[str]], w: torch.Tensor
) -> list[tuple[onnx.NodeProto, str]]:
    """Nodes reading weight ``w`` [out, in], with how B is given: "BT" (Wᵀ, [in, out]) or "W"."""
    sites: list[tuple[onnx.NodeProto, str]] = []
    for iname in matching(w.T):  # stored as Wᵀ [in, out]
        sites += [(n, "BT") for n in G.consumers(iname)]
    for iname in matching(w):  # stored as W [out, in]
        for n in G.consumers(iname):
            if n.op_type == "Transpose" and [a.ints for a in n.attribute if a.name == "perm"] in ([[1, 0]], []):
                sites += [(c, "BT") for c in G.consumers(n.output[0])]
            else:
                sites.append((n, "W"))
    return sites


@dataclass
class _Int4MatMul:
    """The INT4 replacement of one quantized Linear's MatMul / Gemm, in the target's form."""

    G: _Graph
    qw: QuantizedWeight
    base: str
    target: Target
    accuracy_level: int | None

    def matmul(self, a: str, out: str) -> list[onnx.NodeProto]:
        if self.target == "onnxruntime":
            return _matmulnbits_nodes(self.G, a, out, self.qw, self.base, self.accuracy_level)
        dq, wt = _dq_nodes(self.G, self.qw, self.base)
        return [*dq, helper.make_node("MatMul", [a, wt], [out], name=self.G.fresh(self.base + "_MatMul"))]

    def replace(self, node: onnx.NodeProto, how: str) -> tuple[list[onnx.NodeProto] | None, str | None]:
        """(replacement nodes, None), or (None, why not) / (None, None) for a node that is not a consumer."""
        if node.op_type == "MatMul" and how == "BT":
            return self.matmul(node.input[0], node.output[0]), None
        if node.op_type == "Gemm":
            attrs = {a.name: a for a in node.attribute}
            trans_b = attrs["transB"].i if "transB" in attrs else 0
            ok = (
                (attrs["alpha"].f if "alpha" in attrs else 1.0) == 1.0
                and (attrs["beta"].f if "beta" in attrs else 1.0) == 1.0
                and (attrs["transA"].i if "transA" in attrs else 0) == 0
                and ((how == "W" and trans_b == 1) or (how == "BT" and trans_b == 0))
                and len(node.input) > 1
                and node.input[1] in self.G.inits
            )
            if not ok:
                return None, f"Gemm {node.name!r} with alpha/beta/transA/transB not (1, 1, 0, W)"
            out = node.output[0]
            mm_out = self.G.fresh(self.base + "_mm") if len(node.input) > 2 else out
            nodes = self.matmul(node.input[0], mm_out)
            if len(node.input) > 2:
                nodes.append(
                    helper.make_node("Add", [mm_out, node.input[2]], [out], name=self.G.fresh(self.base + "_bias"))
                )
            return nodes, None
        if node.op_type != "Transpose":
            return None, f"weight also read by {node.op_type} {node.name!r} (only MatMul/Gemm handled)"
        return None, None


def _splice(G: _Graph, new_nodes: Mapping[int, list[onnx.NodeProto]]) -> None:
    """Put each replacement where its node was (the graph's topological order is kept)."""
    rebuilt: list[onnx.NodeProto] = []
    for i, n in enumerate(G.g.node):
        rebuilt.extend(new_nodes.get(i, [n]))
    del G.g.node[:]
    G.g.node.extend(rebuilt)


def save_onnx(model: onnx.ModelProto, path: str | Path, *, external: bool = False) -> int:
    """Write ``model`` atomically, its tensors in ``<path>.data`` when ``external`` or above ~1.8 GB (the
    one layout of ``compress.onnx_files``). Returns the bytes on disk, data file included."""
    from compress.onnx_files import EXTERNAL_BYTES, model_bytes, save_model

    path = Path(path)
    tensors = sum(len(t.raw_data) for t in model.graph.initializer)
    save_model(model, path, external=external or tensors > EXTERNAL_BYTES)
    return model_bytes(path)


def rewrite_onnx_file(
    src: str | Path,
    dst: str | Path,
    quantized: Mapping[str, QuantizedWeight],
    float_weights: Mapping[str, torch.Tensor],
    *,
    target: Target = "onnxruntime",
    accuracy_level: int | None = None,
    embeddings: Mapping[str, QuantizedWeight] | None = None,
    strict: bool = True,
) -> RewriteReport:
    """File-to-file ``quantize_onnx_weights``; the report carries both file sizes (with external data)."""
    from compress.onnx_files import model_bytes, wants_external_data

    src = Path(src)
    before, external = model_bytes(src), wants_external_data(src)
    model = onnx.load(src)
    new, report = quantize_onnx_weights(
        model,
        quantized,
        float_weights,
        target=target,
        accuracy_level=accuracy_level,
        embeddings=embeddings,
        strict=strict,
    )
    report.size_before = before
    report.size_after = save_onnx(new, dst, external=external)
    return report
