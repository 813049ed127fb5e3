"""Per-token activation scales for `quantize_dynamic`'s W8A8 graph (SmoothQuant's O1-O3 setting).

``quantize_dynamic`` quantizes each MatMul input with ``DynamicQuantizeLinear``: one uint8 scale and zero
point per tensor, so a 512-token prefill shares one scale over all its tokens and one outlier token costs
the others their resolution. This pass replaces every ``DynamicQuantizeLinear`` by the same outputs
computed per token (per row over the last axis)::

    scale = max(max|x| over the last axis, EPS) / 127            # (..., T, 1)
    x_q   = Cast<uint8>(Clip(Round(x / scale) + 128, 0, 255))     # symmetric int8 range shifted by 128
    zero  = 128                                                   # a scalar, as MatMulInteger needs

The ``MatMulInteger -> Cast -> Mul(x_scale * w_scale)`` after it is ``quantize_dynamic``'s own and
broadcasts the ``(..., T, 1)`` scale against the ``(N,)`` per-channel weight scale; ONNX Runtime's optimizer
still fuses it into ``MatMulIntegerToFloat`` (checked in ``tests/quant/test_int8_per_token.py``).

Why uint8 with zero point 128 and not int8 activations: ``MatMulInteger`` int8 x int8 ran ~30x slower than
uint8 x int8 in ONNX Runtime 1.32's CPU kernels here; the shifted range is exact (``round(x/scale)`` lies in
[-127, 127]). Why our own pass: ONNX Runtime's ``quantize_dynamic`` has no per-token / per-row activation
option (``DynamicQuantizeLinear`` is per-tensor by the ONNX spec, and none of its ``extra_options`` changes
that); its static path calibrates fixed scales, which a per-token scheme does not have.
"""

from __future__ import annotations

from pathlib import Path

#: floor of a token's absmax, so an all-zero row gets scale EPS / 127 instead of a division by zero
EPS = 1e-8
_PREFIX = "per_token_"


def per_token_activations(model) -> int:
    """Rewrite ``model`` (an ``onnx.ModelProto`` from ``quantize_dynamic``) in place; returns how many
    ``DynamicQuantizeLinear`` nodes became per-token."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    consts = {
        "eps": np.float32(EPS),
        "qmax": np.float32(127.0),
        "zp_f": np.float32(128.0),
        "lo": np.float32(0.0),
        "hi": np.float32(255.0),
    }
    nodes, count = [], 0
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        count += 1
        (x,), (y, y_scale, y_zero) = node.input, node.output
        t = f"{_PREFIX}{node.name or y}"
        if opset >= 18:
            axes = f"{t}_axes"
            graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), axes))
            reduce = helper.make_node("ReduceMax", [f"{t}_abs", axes], [f"{t}_max"], keepdims=1, name=f"{t}_max")
        else:
            reduce = helper.make_node("ReduceMax", [f"{t}_abs"], [f"{t}_max"], axes=[-1], keepdims=1, name=f"{t}_max")
        c = {k: _PREFIX + k for k in consts}
        nodes += [
            helper.make_node("Abs", [x], [f"{t}_abs"], name=f"{t}_abs"),
            reduce,
            helper.make_node("Max", [f"{t}_max", c["eps"]], [f"{t}_maxe"], name=f"{t}_maxe"),
            helper.make_node("Div", [f"{t}_maxe", c["qmax"]], [y_scale], name=f"{t}_scale"),
            helper.make_node("Div", [x, y_scale], [f"{t}_div"], name=f"{t}_div"),
            helper.make_node("Round", [f"{t}_div"], [f"{t}_round"], name=f"{t}_round"),
            helper.make_node("Add", [f"{t}_round", c["zp_f"]], [f"{t}_shift"], name=f"{t}_shift"),
            helper.make_node("Clip", [f"{t}_shift", c["lo"], c["hi"]], [f"{t}_clip"], name=f"{t}_clip"),
            helper.make_node("Cast", [f"{t}_clip"], [y], to=TensorProto.UINT8, name=f"{t}_cast"),
        ]
        graph.initializer.append(numpy_helper.from_array(np.array(128, dtype=np.uint8), y_zero))
    if count:
        graph.initializer.extend(numpy_helper.from_array(np.array(v), _PREFIX + k) for k, v in consts.items())
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.value_info[:]  # shapes inferred for per-tensor scales (a scalar, now (..., T, 1)) are stale
    return count


def rewrite_file(path: Path) -> int:
    """`per_token_activations` on the graph at ``path``, rewritten in place; its external data file (the
    weights, untouched) stays where it is."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    count = per_token_activations(model)
    onnx.save(model, str(path))
    return count
