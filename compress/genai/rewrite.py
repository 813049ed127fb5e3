"""Fixes to the builder's output graph for what onnxruntime-genai 0.18 gets wrong with GPTQ inputs.

A tied embedding read from a pre-quantized GPTQ lm_head: the builder points GatherBlockQuantized at the
lm_head MatMulNBits' scales / zero points, which its GPTQ loader flattens to 1-D (MatMulNBits' layout,
``[N * n_blocks]``), while GatherBlockQuantized needs them with the rank of its data (``[vocab,
n_blocks]``, zero points ``[vocab, ceil(n_blocks/2)]`` for 4 bits); ONNX Runtime refuses to load the
file. (Its quant_auto loader reshapes them; the GPTQ loader does not.) Reshape nodes in front of the
gather fix it without a second copy of the tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def reshape_gather_block_quantized_params(model_path: Path) -> int:
    """Give every GatherBlockQuantized 2-D scales / zero points; rewrites ``model_path`` (graph only).

    Returns the number of inputs reshaped (0 leaves the file untouched).
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
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
    if changed:
        onnx.save(model, str(model_path))
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
