"""Fixes to the builder's output graph where onnxruntime-genai 0.18 gets the tied embedding wrong.

Both concern the GatherBlockQuantized that reads a tied embedding from the lm_head's quantized tensors:

1. A pre-quantized GPTQ lm_head: the gather gets the lm_head MatMulNBits' scales / zero points, which
   the GPTQ loader flattens to 1-D (MatMulNBits' layout ``[N * n_blocks]``), while GatherBlockQuantized
   needs the rank of its data (``[vocab, n_blocks]``; 4-bit zero points ``[vocab, ceil(n_blocks/2)]``):
   ONNX Runtime refuses the file. (The quant_auto loader reshapes them; the GPTQ loader does not.)
   A Reshape in front of the gather fixes it without a second copy of the tensors.
2. An 8-bit lm_head (``matmul_mixed_precision=last_matmul:int8``): the gather names tensors the
   quantizer never wrote (``lm_head.MatMul.weight_Q8G32`` / ``weight_scale``; written are ``weight_Q8`` /
   ``weight_scales``), an invalid graph. The gather is pointed at the lm_head MatMulNBits' inputs.

And one size fix (``drop_default_zero_points``): the GPTQ loader always writes zero points, symmetric
weights included (a uint8 per block at 8 bits, a nibble at 4), where MatMulNBits and GatherBlockQuantized
(uint8 data) take ``2**(bits-1)`` when the input is absent. A zero-point tensor every value of which is that
default is removed (on SmolLM2 at 8 bits, g32: 4.2 MB of 157.7); any other value keeps the tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: what this module does to a built graph; joins the cache key of every genai artifact built from our weights
#: (2: default zero points removed)
GRAPH_REWRITE = 2


def fix_tied_embedding(model_path: Path) -> int:
    """Apply both fixes of the module docstring to ``model_path`` (graph only, data untouched).

    Returns the number of inputs changed (0 leaves the file as it was).
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    changed = _relink_dangling_inputs(model) + _reshape_params(model)
    if changed:
        onnx.save(model, str(model_path))
    return changed


def _relink_dangling_inputs(model) -> int:
    """Point the gather (and the Reshape feeding it) at the lm_head MatMulNBits' weight / scales / zeros."""
    known = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    known |= {o for n in model.graph.node for o in n.output}
    head = next((n for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/")), None)
    changed = 0
    for node in model.graph.node:
        if head is None or node.op_type not in ("GatherBlockQuantized", "Reshape") or "embed_tokens" not in node.name:
            continue
        slots = {0: 1} if node.op_type == "Reshape" else {2: 2, 3: 3}  # this node's input -> lm_head's input
        for mine, theirs in slots.items():
            if len(node.input) > mine and node.input[mine] and node.input[mine] not in known:
                if len(head.input) <= theirs or not head.input[theirs]:
                    raise ValueError(f"{node.name}: input {node.input[mine]!r} missing and the lm_head has no match")
                node.input[mine] = head.input[theirs]
                changed += 1
    return changed


def _reshape_params(model) -> int:
    """Give every GatherBlockQuantized 2-D scales / zero points (fix 1)."""
    from onnx import helper, numpy_helper

    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    changed = 0
    for node in [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]:
        data_shape = _data_shape(model, node.input[0], shapes)
        if data_shape is None:
            continue
        rows = data_shape[0]
        for slot in (2, 3):  # scales, zero_points
            if len(node.input) <= slot or not node.input[slot] or len(shapes.get(node.input[slot], [0, 0])) != 1:
                continue
            source = node.input[slot]
            target = f"{source}/gather_2d"
            shape_name = f"{target}/shape"
            model.graph.initializer.append(numpy_helper.from_array(np.array([rows, -1], np.int64), shape_name))
            index = list(model.graph.node).index(node)
            model.graph.node.insert(index, helper.make_node("Reshape", [source, shape_name], [target], name=target))
            node.input[slot] = target
            changed += 1
    return changed


def _data_shape(model, name: str, shapes: dict[str, list[int]]) -> list[int] | None:
    """Shape of the gather's data: an initializer, or the output of the Reshape (to a constant) that feeds it."""
    if name in shapes:
        return shapes[name]
    import onnx
    from onnx import numpy_helper

    constants = {
        t.name: numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT64 and t.data_location != onnx.TensorProto.EXTERNAL
    }
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = numpy_helper.to_array(value)
    for node in model.graph.node:
        if node.output and node.output[0] == name and node.op_type == "Reshape" and node.input[1] in constants:
            return [int(d) for d in constants[node.input[1]]]
    return None


def drop_default_zero_points(model_path: Path) -> int:
    """Remove every uint8 zero-point tensor equal to the kernels' default ``2**(bits-1)`` everywhere it is read.

    A tensor is dropped only when every reader is a MatMulNBits / GatherBlockQuantized taking it as input 3
    (directly or through the Reshape of ``_reshape_params``) and every zero point it holds, read with that
    reader's bits and blocks (packing padding aside), is the default: the graph computes the same. The external
    data file is rewritten without those bytes (the model is loaded whole, as the builder held it). Returns the
    number of tensors removed (0 leaves the files as they were).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    nodes = list(model.graph.node)
    consumers: dict[str, list[tuple[int, int]]] = {}
    for index, node in enumerate(nodes):
        for slot, name in enumerate(node.input):
            consumers.setdefault(name, []).append((index, slot))
    drop_nodes: set[int] = set()
    removed = []
    for init in model.graph.initializer:
        readers = _zero_point_readers(init.name, nodes, consumers)
        if not readers or init.data_type != onnx.TensorProto.UINT8:
            continue
        zeros = numpy_helper.to_array(init)
        if not all(_all_default(zeros, nodes[reader]) for reader, _ in readers):
            continue
        for reader, via in readers:
            node = nodes[reader]
            node.input[3] = ""
            while node.input and not node.input[-1]:
                node.input.pop()
            if via is not None:
                drop_nodes.add(via)
        removed.append(init)
    if not removed:
        return 0
    for index in sorted(drop_nodes, reverse=True):
        del model.graph.node[index]
    for init in removed:
        model.graph.initializer.remove(init)
    _drop_unused_initializers(model)
    _save_with_data(model, model_path)
    return len(removed)


def _zero_point_readers(name: str, nodes: list, consumers: dict[str, list[tuple[int, int]]]) -> list[tuple]:
    """(reader index, index of the Reshape between or None) for a tensor read only as zero points, else []."""
    readers = []
    for index, slot in consumers.get(name, []):
        node = nodes[index]
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized") and slot == 3:
            readers.append((index, None))
        elif node.op_type == "Reshape" and slot == 0 and len(node.output) == 1:
            after = consumers.get(node.output[0], [])
            if len(after) != 1 or nodes[after[0][0]].op_type != "GatherBlockQuantized" or after[0][1] != 3:
                return []
            readers.append((after[0][0], index))
        else:
            return []
    return readers


def _all_default(zeros: np.ndarray, node) -> bool:
    """Every zero point of ``node``'s blocks equals ``2**(bits-1)`` (low nibble first, rows padded to bytes)."""
    attrs = {a.name: a.i for a in node.attribute}
    bits = attrs.get("bits", 4)
    if bits not in (2, 4, 8):
        return False
    if node.op_type == "MatMulNBits":
        rows, blocks = attrs["N"], -(-attrs["K"] // attrs["block_size"])
    else:  # GatherBlockQuantized (the tied embedding): its width is no attribute, so every stored value counts
        rows, blocks = 1, None
    per_byte = 8 // bits
    packed = zeros.reshape(rows, -1).astype(np.uint16)
    unpacked = np.stack([(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)], axis=-1)
    unpacked = unpacked.reshape(rows, -1)
    if blocks is not None:
        if unpacked.shape[1] < blocks:
            return False
        unpacked = unpacked[:, :blocks]
    return bool((unpacked == 1 << (bits - 1)).all())


def _drop_unused_initializers(model) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    for init in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(init)


def _save_with_data(model, model_path: Path) -> None:
    """Write ``model`` and its one external data file in a folder beside ``model_path``, then move both in."""
    import os
    import shutil
    import tempfile

    import onnx

    data_name = f"{model_path.name}.data"
    work = Path(tempfile.mkdtemp(prefix=f".{model_path.name}.", dir=model_path.parent))
    try:
        onnx.save_model(
            model,
            str(work / model_path.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,  # tensors < 1 KB (the Reshape shapes, which shape inference reads) stay inline
        )
        mode = model_path.stat().st_mode
        for name in (data_name, model_path.name):
            os.chmod(work / name, mode)
        os.replace(work / data_name, model_path.with_name(data_name))
        os.replace(work / model_path.name, model_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
