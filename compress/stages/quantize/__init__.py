"""`quantize`: one stage name, one options key (`precision`) choosing the scheme; one file per scheme.

Scheme keys at the top; `method:` and `target:` take a name or `{name: ..., <its keys>}`
(`compress.quant.algorithms`, `compress.quant.targets`).

```yaml
- quantize: {precision: int8, method: {name: static, calibrator: percentile}, target: onnxruntime-cpu}
- quantize: {precision: int4, method: gptq, group_size: 128}
```
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from compress.registry import register_stage
from compress.stages.base import StageContext, StageOutput
from compress.stages.quantize.int4 import Int4Options, quantize_int4
from compress.stages.quantize.int8 import Int8Options, quantize_int8

QuantizeOptions = Annotated[Int8Options | Int4Options, Field(discriminator="precision")]
_SCHEMES = {Int8Options: quantize_int8, Int4Options: quantize_int4}


@register_stage("quantize", options=QuantizeOptions)
def quantize(artifact, options, ctx: StageContext) -> StageOutput:
    """Quantize an artifact; `precision` picks the scheme (int8: ONNX-side Q/DQ or MatMulNBits; int4:
    torch-side RTN/GPTQ/AWQ or a GPTQ checkpoint, carried into ONNX)."""
    return _SCHEMES[type(options)](artifact, options, ctx)
