"""A tied embedding stored once in a weight-only INT8 graph: the Gather reads the lm_head's 8-bit codes.

    share_quantized_table(model, head)   # after MatMulNBitsQuantizer, before saving

Our FP32 export already stores a tied table once (``export.share_tied_embedding``: the embedding is
``Gather(Wᵀ (H, V), ids, axis=1) -> Transpose``, reading the lm_head's float ``Wᵀ``). ONNX Runtime's
``MatMulNBitsQuantizer`` then replaces the lm_head MatMul by a MatMulNBits and leaves that float table in
place for the Gather: on SmolLM2-135M 113 MB of FP32 beside the 8-bit head (the 266 MB file of issue 12).
ORT's quantizer has no option to quantize a Gather at 8 bits that shares the head's codes (its
``quant_format``/``GatherBlockQuantized`` path is 4-bit and unties the table), hence this small rewrite.

Here the Gather + Transpose become one ``com.microsoft.GatherBlockQuantized`` over the head's MatMulNBits
tensors: its ``B`` ``(V, n_blocks, block)`` uint8 reshaped to ``(V, H)``, its ``scales`` ``(V, n_blocks)``
and, when present, its zero points (else an explicit 128, the MatMulNBits 8-bit default). MatMulNBits
quantizes ``W`` row by row along ``K = H``, which is exactly the embedding's row ``E[v]`` in blocks along
``H``: the gather dequantizes to the same values the lm_head multiplies with (tests/quant/test_int8_file.py).
The float table is then dropped. An untied embedding (its own float table) is left as it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MS_DOMAIN = "com.microsoft"
#: MatMulNBits' implicit zero point of unsigned 8-bit codes when the node has no zero_points input
_DEFAULT_ZP8 = 128


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def share_quantized_table(model: Any, head_weight: str, head_output: str) -> bool:
    """Rewrite the tied gather of ``head_weight`` to read the 8-bit lm_head producing ``head_output``.

    ``head_weight`` / ``head_output``: the FP32 lm_head MatMul's weight initializer and output names (taken
    from the source graph before quantization). Returns whether the graph changed: False when there is no
    such gather, the head is not an 8-bit MatMulNBits, or its K is padded (K not a multiple of the block).
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and head_output in n.output), None)
    if head is None:
        return False
    a = _attrs(head)
    k, n, bits, block = a["K"], a["N"], a["bits"], a["block_size"]
    if bits != 8 or k % block:
        return False
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    gathers = [
        g
        for g in consumers.get(head_weight, [])
        if g.op_type == "Gather"
        and g.input[0] == head_weight
        and _attrs(g).get("axis", 0) == 1
        and [c.op_type for c in consumers.get(g.output[0], [])] == ["Transpose"]
        and list(_attrs(consumers[g.output[0]][0]).get("perm", [])) == [1, 2, 0]
    ]
    if not gathers:
        return False
    inits = {t.name: t for t in graph.initializer}
    table = inits.get(head_weight)
    if table is None or tuple(table.dims) != (k, n):
        return False
    base = head.name + "/embedding"
    shape = numpy_helper.from_array(np.array([n, k], np.int64), base + "/codes_shape")
    codes = helper.make_node("Reshape", [head.input[1], shape.name], [base + "/codes"], name=base + "/codes")
    new_inits, new_nodes = [shape], [codes]
    scales = head.input[2]
    if len(head.input) > 3 and head.input[3]:
        zero_points = head.input[3]  # ORT's 8-bit asymmetric zero points: one uint8 per block, (N, n_blocks)
    else:
        zp = np.full((n, k // block), _DEFAULT_ZP8, np.uint8)
        zero_points = base + "/zero_points"
        new_inits.append(numpy_helper.from_array(zp, zero_points))
    for g in gathers:
        transpose = consumers[g.output[0]][0]
        new_nodes.append(
            helper.make_node(
                "GatherBlockQuantized",
                [codes.output[0], g.input[1], scales, zero_points],
                list(transpose.output),
                name=g.name + "/GatherBlockQuantized8",
                domain=MS_DOMAIN,
                gather_axis=0,
                quantize_axis=1,
                block_size=block,
                bits=8,
            )
        )
    drop = {id(g) for g in gathers} | {id(consumers[g.output[0]][0]) for g in gathers}
    first = min(i for i, node in enumerate(graph.node) if id(node) in drop)  # the ids exist from here on
    rebuilt = [*graph.node[:first], *new_nodes, *(node for node in graph.node[first:] if id(node) not in drop)]
    del graph.node[:]
    graph.node.extend(rebuilt)
    graph.initializer.extend(new_inits)
    if not any(head_weight in node.input for node in graph.node):
        graph.initializer.remove(table)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return True
