"""`export`: torch -> ONNX with a dynamic batch, then a parity check against torch on real inputs.

```yaml
- export: {opset: 17, atol: 1.0e-3}
```
Parity: |onnx - torch| <= atol + rtol * |torch| on every logit of `parity_samples` calibration inputs.
FP32 ONNX Runtime and eager torch differ by float reassociation only (~1e-5 on logits), so a breach
means a wrong graph, and fails the stage.

The exporter writes into a scratch folder; the artifact gets `model.onnx`, plus `model.onnx.data` holding
every tensor when the model is large (`compress.onnx_files`: the TorchScript exporter would leave one file
per tensor). The exporter's warnings (tracer, constant folding) stay off the console.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from pydantic import Field

from compress.errors import StageError
from compress.registry import register_stage
from compress.schema import Count, Real
from compress.stages.base import StageContext, StageOptions, StageOutput


class ExportOptions(StageOptions):
    """Export a torch artifact to ONNX and check it against torch."""

    opset: Count = Field(17, ge=13, le=23, description="ONNX opset (>= 18 with dynamo)")
    dynamo: bool = Field(False, description="use the torch.export-based exporter instead of TorchScript")
    parity_samples: Count = Field(32, gt=0, description="real inputs used for the parity check")
    atol: Real = Field(1e-3, ge=0)
    rtol: Real = Field(1e-3, ge=0)

    def output_format(self, input_format: str) -> str:
        return "onnx"


@register_stage("export", options=ExportOptions)
def export(artifact, options: ExportOptions, ctx: StageContext) -> StageOutput:
    """Export to ONNX (dynamic batch) and fail if ONNX Runtime disagrees with torch."""
    import onnx

    if options.dynamo and options.opset < 18:
        raise StageError(f"export: dynamo=true needs opset >= 18 (got {options.opset})")
    from compress.progress import quiet_third_party

    adapter = ctx.adapter
    model = adapter.load_torch(artifact)
    path = ctx.outdir / "model.onnx"
    start = time.perf_counter()
    export_to(adapter, model, path, opset=options.opset, dynamo=options.dynamo)
    onnx.checker.check_model(str(path))
    seconds = time.perf_counter() - start

    with quiet_third_party():
        parity = adapter.check_export(
            model, path, samples=options.parity_samples, atol=options.atol, rtol=options.rtol, threads=ctx.threads
        )
    info = {
        "export_seconds": round(seconds, 2),
        **parity,
        "opset": options.opset,
        "exporter": "dynamo" if options.dynamo else "torchscript",
    }
    ctx.reporter.log(f"  parity: max |onnx - torch| = {parity['parity_max_abs_diff']:.2e}")
    return StageOutput(file="model.onnx", format="onnx", precision=artifact.precision, info=info)


def export_to(adapter, model, path: Path, *, opset: int, dynamo: bool) -> None:
    """`adapter.export_onnx` into a scratch folder beside `path`, then `move_model` to `path` (one data file)."""
    import torch

    from compress.onnx_files import move_model
    from compress.progress import quiet_third_party

    scratch = path.parent / f"_export-{path.stem}"
    scratch.mkdir()
    try:
        with torch.inference_mode(), quiet_third_party():
            adapter.export_onnx(model, scratch / path.name, opset=opset, dynamo=dynamo)
        move_model(scratch / path.name, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
