"""What every quantize scheme checks: the input is still float, and the output holds quantized nodes.

A quantizer that finds nothing it can quantize writes the graph back unchanged; labelled "int8", that file
would be evaluated, gated and shipped as a quantized model. Counting the quantized nodes after the fact
turns that into a stage failure with the reason, and the count goes into the artifact's info.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from compress.errors import StageError

FLOAT_PRECISIONS = frozenset({"fp32", "fp16", "bf16"})
#: ONNX ops that compute on, or produce, quantized tensors
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulNBits",
        "MatMulInteger",
        "ConvInteger",
        "GatherBlockQuantized",
    }
)


def input_problem(name: str, precision: str, scheme: str) -> str | None:
    """Why `scheme` cannot start from artifact `name` of `precision` (None when it can)."""
    if precision in FLOAT_PRECISIONS:
        return None
    return (
        f"'{name}' is already {precision}; {scheme} starts from a float (fp32/fp16) artifact: "
        "set `input:` to one (e.g. the export it came from)"
    )


def refuse_quantized_input(artifact, scheme: str) -> None:
    """Raise StageError when `artifact` is already quantized (the run-time twin of the validate check)."""
    problem = input_problem(artifact.name, artifact.precision, scheme)
    if problem:
        raise StageError(problem)


def op_counts(path: Path) -> Counter[str]:
    """Node count by op type of the ONNX graph at `path` (external data not loaded)."""
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def quantized_nodes(counts: Counter[str]) -> dict[str, int]:
    """The quantized ops among `counts` (QLinear* included), by op type."""
    return {op: n for op, n in sorted(counts.items()) if op in QUANTIZED_OPS or op.startswith("QLinear")}


def require_quantized(out: Path, src: Path, scheme: str, hint: str) -> dict[str, int]:
    """Quantized nodes the stage added (graph `out` against its input `src`), by op type; StageError when
    there is none, naming what the input had and `hint` (what to do instead)."""
    before, after = op_counts(src), op_counts(out)
    added = {op: n - before.get(op, 0) for op, n in quantized_nodes(after).items() if n > before.get(op, 0)}
    if not added:
        has = ", ".join(f"{before.get(op, 0)} {op}" for op in ("Conv", "Gemm", "MatMul"))
        raise StageError(f"{scheme}: no node was quantized (the model has {has} nodes); {hint}")
    return added
