"""What a quantization scheme fixes whatever the algorithm or the target: the group size rule.

One rule for every precision (int8 weight-only and int4 alike): a group (a block of input columns
sharing one scale) is a power of two >= 16. That is ONNX Runtime's `MatMulNBits` rule (its `block_size`
attribute); TensorRT's blocked INT4 `DequantizeLinear` states no power-of-two rule in its documentation
(`compress.checks.tensorrt` requires a positive `block_size`), so the stricter rule keeps one file
valid for both targets.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator

from compress.schema import Count

MIN_GROUP = 16


def group_size_problem(group_size: int) -> str | None:
    """Why `group_size` is not a valid group (None when it is)."""
    if group_size < MIN_GROUP or group_size & (group_size - 1):
        return (
            f"group_size = {group_size}; allowed: a power of two >= {MIN_GROUP} (e.g. 32, 64, 128: ONNX Runtime's "
            "MatMulNBits block rule)"
        )
    return None


def _check_group(value: Any) -> Any:
    problem = group_size_problem(value)
    if problem:
        raise ValueError(problem)
    return value


#: input columns sharing one scale / zero point (int4, int8 weight-only)
GroupSize = Annotated[Count, AfterValidator(_check_group)]

#: dtype of the hidden states layer-streamed GPTQ / AWQ keep between layers (`compress.quant.streamed`); every
#: layer still computes in float32
ActivationDtype = Literal["float32", "bfloat16", "float16"]
