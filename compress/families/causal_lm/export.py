"""Export a Hugging Face decoder to ONNX with a KV cache, describe its I/O, and check parity with torch.

    from compress.families.causal_lm.export import export_decoder, check_parity
    export_decoder(model, Path("model.onnx"))
    session = OrtCausalLM(Path("model.onnx"))                  # compress.families.causal_lm.sessions
    report = check_parity(model, session, [[1, 2, 3]], atol=1e-3, steps=16)

One graph serves prefill (``past_sequence = 0``) and decode (``sequence = 1``):

=========================  ======================================  ================================
name                       shape                                   notes
=========================  ======================================  ================================
input_ids                  [batch, sequence] int64
attention_mask             [batch, total_sequence] int64           total = past + sequence; 0 = pad
position_ids               [batch, sequence] int64                 cumsum(mask) - 1 for left padding
past_key_values.{i}.key    [batch, kv_heads, past_sequence, dim]   float32, also ``.value``
logits                     [batch, sequence, vocab] float32
present.{i}.key            [batch, kv_heads, total_sequence, dim]  feed back as the next past
=========================  ======================================  ================================

The names follow Optimum / onnxruntime-genai so other tools can run the file. transformers 5 passes a
``Cache`` object rather than tuples, so a wrapper module turns the flat tensors into a ``DynamicCache`` and
back. The TorchScript exporter (``dynamo=False``) is used: it exports this wrapper in seconds and was
checked against HF generation (greedy tokens identical; tests/families/causal_lm/test_onnx_export.py); the dynamo
exporter is available as an option.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compress.errors import StageError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from compress.backends import DecoderSession

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
TWO_GB = 2 * 1024**3


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


@dataclass(frozen=True)
class KVLayout:
    """What the KV cache of a decoder looks like: read from its config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> KVLayout:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, config.vocab_size)


def _wrapper(model: PreTrainedModel) -> torch.nn.Module:
    """A module taking flat tensors (ids, mask, positions, k0, v0, k1, ...) and returning flat outputs."""
    import torch
    from transformers import DynamicCache

    layout = KVLayout.from_config(model.config)

    class DecoderWithCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):  # noqa: ANN001
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(layout.num_layers)]
            # No config: every layer keeps its whole past, sliding-window layers too (a sliding cache layer
            # crops by Python ints the tracer freezes). The mask still limits them to their window, and
            # past/present keep one shape across layers.
            cache = DynamicCache(pairs)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                return_dict=True,
            )
            flat = []
            for layer in out.past_key_values.layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return DecoderWithCache().eval()


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS]
    outputs = [LOGITS]
    for i in range(num_layers):
        inputs += [past_name(i, "key"), past_name(i, "value")]
        outputs += [present_name(i, "key"), present_name(i, "value")]
    return inputs, outputs


def export_decoder(
    model: PreTrainedModel,
    onnx_path: Path,
    *,
    opset: int = 17,
    dynamo: bool = False,
    external_data: bool | None = None,
) -> Path:
    """Export ``model`` (any HF causal LM whose forward takes ``past_key_values``) to ``onnx_path``.

    ``external_data=None`` stores weights beside the graph (``<name>.data``) only when they exceed the
    2 GB protobuf limit. Tied and untied embeddings both work: the TorchScript exporter keeps one
    initializer for a tied weight shared by the Gather and the lm_head MatMul. The file is written to a
    temporary folder and moved into place when complete.
    """
    import onnx
    import torch

    if not hasattr(model, "config") or not hasattr(model.config, "num_hidden_layers"):
        raise ValueError(f"export_decoder: {type(model).__name__} is not a transformers decoder")
    layout = KVLayout.from_config(model.config)
    model = model.eval()
    wrapper = _wrapper(model)
    batch, seq, past = 2, 3, 4
    dtype = next(model.parameters()).dtype
    example: list[torch.Tensor] = [
        torch.randint(0, layout.vocab_size, (batch, seq)),  # (B, T)
        torch.ones(batch, past + seq, dtype=torch.long),  # (B, P+T)
        torch.arange(past, past + seq).expand(batch, seq).contiguous(),  # (B, T)
    ]
    for _ in range(2 * layout.num_layers):
        example.append(torch.randn(batch, layout.num_kv_heads, past, layout.head_dim, dtype=dtype))
    inputs, outputs = io_names(layout.num_layers)
    dynamic_axes: dict[str, dict[int, str]] = {
        INPUT_IDS: {0: "batch", 1: "sequence"},
        ATTENTION_MASK: {0: "batch", 1: "total_sequence"},
        POSITION_IDS: {0: "batch", 1: "sequence"},
        LOGITS: {0: "batch", 1: "sequence"},
    }
    for i in range(layout.num_layers):
        for kind in ("key", "value"):
            dynamic_axes[past_name(i, kind)] = {0: "batch", 2: "past_sequence"}
            dynamic_axes[present_name(i, kind)] = {0: "batch", 2: "total_sequence"}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    use_external = weight_bytes > TWO_GB * 0.95 if external_data is None else external_data

    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{onnx_path.stem}.", dir=onnx_path.parent))
    try:
        raw = tmp / "raw.onnx"
        kwargs: dict[str, Any] = {
            "input_names": inputs,
            "output_names": outputs,
            "opset_version": opset,
            "do_constant_folding": True,
        }
        if dynamo:
            kwargs["dynamic_shapes"] = _dynamo_shapes(layout.num_layers)
        else:
            kwargs["dynamic_axes"] = dynamic_axes
        # The tracer warns on every Python branch of HF's mask code; parity checks what matters.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(wrapper, tuple(example), str(raw), dynamo=dynamo, **kwargs)
        proto = onnx.load(str(raw), load_external_data=True)
        if getattr(model.config, "tie_word_embeddings", False):
            share_tied_embedding(proto)
        final = tmp / onnx_path.name
        if use_external:
            onnx.save_model(
                proto,
                str(final),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=onnx_path.name + ".data",
                size_threshold=1024,
            )
        else:
            onnx.save_model(proto, str(final))
        del proto
        for stale in (onnx_path, onnx_path.with_name(onnx_path.name + ".data")):
            if stale.exists():
                stale.unlink()
        if use_external:
            os.replace(tmp / (onnx_path.name + ".data"), onnx_path.with_name(onnx_path.name + ".data"))
        os.replace(final, onnx_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return onnx_path


def share_tied_embedding(proto: Any) -> bool:
    """Store a tied embedding once: the exporter folds ``lm_head = embed.T`` into a second initializer.

    The embedding ``Gather(E (V, H), ids)`` is rewritten to ``Gather(E.T (H, V), ids, axis=1)`` -> (H, B, T)
    followed by a ``Transpose`` to (B, T, H), so the lm_head's transposed copy serves both and ``E`` is
    dropped (SmolLM2-135M: -113 MB). A gather along axis 1 reads H strided values per token: negligible
    next to the lm_head MatMul. Returns whether the graph changed (only when the arrays are equal).
    """
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    head = lm_head_matmul(graph)
    if head is None or head.input[1] not in inits:
        return False
    weight = numpy_helper.to_array(inits[head.input[1]])  # (H, V)
    for index, node in enumerate(graph.node):
        if node.op_type != "Gather" or node.input[0] not in inits or node.input[0] == head.input[1]:
            continue
        table = inits[node.input[0]]
        if tuple(table.dims) != weight.shape[::-1]:
            continue
        if not np.array_equal(numpy_helper.to_array(table).T, weight):
            continue
        old, out = node.input[0], node.output[0]
        node.input[0] = head.input[1]
        node.output[0] = out + "/hidden_first"
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("axis", 1))
        transpose = onnx.helper.make_node(
            "Transpose", [node.output[0]], [out], perm=[1, 2, 0], name=node.name + "/to_bth"
        )  # (H, B, T) -> (B, T, H)
        graph.node.insert(index + 1, transpose)
        if not any(old in n.input for n in graph.node):
            graph.initializer.remove(table)
        return True
    return False


# Ops that may follow the lm_head MatMul on the way to `logits` (Gemma 2's soft-capping: x / c, tanh, * c)
_LOGIT_EPILOGUE = frozenset({"Mul", "Div", "Tanh", "Add", "Cast"})


def lm_head_matmul(graph: Any) -> Any:
    """The MatMul/Gemm node whose output becomes ``logits``, through soft-capping ops; None if there is none."""
    producer = {out: node for node in graph.node for out in node.output}
    inits = {t.name for t in graph.initializer}
    node = producer.get(LOGITS)
    while node is not None and node.op_type in _LOGIT_EPILOGUE:
        computed = [i for i in node.input if i in producer and i not in inits and producer[i].op_type != "Constant"]
        if len(computed) != 1:
            return None
        node = producer[computed[0]]
    return node if node is not None and node.op_type in ("MatMul", "Gemm") else None


def _dynamo_shapes(num_layers: int) -> tuple[Any, ...]:
    """Dynamic shapes for ``dynamo=True``: the attention mask needs its own dim (``total_sequence``); one derived
    from ``sequence`` and ``past_sequence`` does not export."""
    from torch.export import Dim

    b, s, p, t = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    kv = {0: b, 2: p}
    # forward(input_ids, attention_mask, position_ids, *past): the varargs form one nested tuple.
    return ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple([kv] * (2 * num_layers)))


def describe_io(onnx_path: Path) -> dict[str, Any]:
    """Names, element types and dims (ints or symbolic names) of the graph's inputs and outputs.

    Also derives ``num_layers``, ``num_kv_heads``, ``head_dim`` and ``vocab_size`` for KV decoders.
    Reads the graph only (external weights are not loaded).
    """
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)

    def values(items: Sequence[Any]) -> list[dict[str, Any]]:
        rows = []
        for v in items:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            rows.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "dims": dims})
        return rows

    info: dict[str, Any] = {"inputs": values(proto.graph.input), "outputs": values(proto.graph.output)}
    past = [r for r in info["inputs"] if r["name"].startswith("past_key_values.")]
    info["num_layers"] = len(past) // 2
    if past:
        info["num_kv_heads"], info["head_dim"] = past[0]["dims"][1], past[0]["dims"][3]
        info["kv_dtype"] = past[0]["dtype"]
    logits = next((r for r in info["outputs"] if r["name"] == LOGITS), None)
    info["vocab_size"] = logits["dims"][2] if logits else None
    info["opset"] = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
    return info


@dataclass
class ParityReport:
    """Largest |logit difference| at prefill and over decode steps, and the greedy-token comparison."""

    prefill_max_abs: float
    decode_max_abs: float
    steps: int
    atol: float
    torch_tokens: list[int] = field(default_factory=list)
    onnx_tokens: list[int] = field(default_factory=list)

    @property
    def tokens_match(self) -> bool:
        return self.torch_tokens == self.onnx_tokens

    @property
    def ok(self) -> bool:
        return self.prefill_max_abs <= self.atol and self.decode_max_abs <= self.atol and self.tokens_match


def check_parity(
    model: PreTrainedModel,
    session: DecoderSession,
    tokenizer_or_ids: Any,
    *,
    atol: float = 1e-3,
    steps: int = 16,
    raise_on_failure: bool = True,
) -> ParityReport:
    """Compare torch and an exported decoder's session (`sessions.OrtCausalLM`) at prefill and over
    ``steps`` cached greedy decode steps.

    ``tokenizer_or_ids`` is a tokenizer (the prompt "The capital of France is" is used), a 1-D id list,
    or an array (1, T). Torch runs its own cache; the session feeds its presents back as past, so this
    checks the KV plumbing as well as the math. The greedy tokens must be identical. Raises
    :class:`StageError` when out of tolerance unless ``raise_on_failure=False``.
    """
    import torch

    if hasattr(tokenizer_or_ids, "encode"):
        ids = np.asarray([tokenizer_or_ids.encode("The capital of France is")], dtype=np.int64)
    else:
        ids = np.asarray(tokenizer_or_ids, dtype=np.int64).reshape(1, -1)  # (1, T)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), use_cache=True)
        t_logits = out.logits[:, -1].float().numpy()  # (1, V)
        past = out.past_key_values
        o_logits, state = session.prefill(ids)
        prefill_err = float(np.abs(out.logits.float().numpy() - o_logits).max())
        o_last = o_logits[:, -1]
        decode_err = 0.0
        t_tokens: list[int] = []
        o_tokens: list[int] = []
        for _ in range(steps):
            t_next = int(t_logits.argmax(-1)[0])
            o_next = int(o_last.argmax(-1)[0])
            t_tokens.append(t_next)
            o_tokens.append(o_next)
            # Both sides continue with the torch token, so the logits comparison stays aligned even if
            # the greedy choice differs (the tokens list records that separately).
            step = np.asarray([[t_next]], dtype=np.int64)
            out = model(input_ids=torch.from_numpy(step), past_key_values=past, use_cache=True)
            past = out.past_key_values
            t_logits = out.logits[:, -1].float().numpy()
            o_step, state = session.decode(step, state)
            o_last = o_step[:, -1]
            decode_err = max(decode_err, float(np.abs(t_logits - o_last).max()))
    report = ParityReport(prefill_err, decode_err, steps, atol, t_tokens, o_tokens)
    if raise_on_failure and not report.ok:
        raise StageError(
            f"ONNX export parity failed for {getattr(session, 'path', 'the session')}: "
            f"max |Δlogit| prefill {prefill_err:.3g}, "
            f"decode {decode_err:.3g} (atol {atol}); greedy tokens identical: {report.tokens_match} "
            f"(torch {t_tokens}, onnx {o_tokens})"
        )
    return report
