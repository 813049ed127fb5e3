"""`quantize`: one stage name, one options key (`precision`) choosing the scheme; one file per scheme.

```yaml
- quantize: {precision: int8, calibrator: percentile, target: onnxruntime-cpu}
```
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from compress.registry import register_stage
from compress.stages.base import StageContext, StageOutput
from compress.stages.quantize.int8 import Int8Options, quantize_int8

QuantizeOptions = Annotated[Int8Options, Field(discriminator="precision")]
_SCHEMES = {Int8Options: quantize_int8}


@register_stage("quantize", options=QuantizeOptions)
def quantize(artifact, options, ctx: StageContext) -> StageOutput:
    """Quantize an artifact; `precision` picks the scheme (int8: calibrated static Q/DQ in ONNX)."""
    return _SCHEMES[type(options)](artifact, options, ctx)
