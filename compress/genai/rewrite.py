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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
