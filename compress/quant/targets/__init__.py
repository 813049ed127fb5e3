"""Deployment targets of a quantized ONNX graph, each an options model registered by name (`target:`).

- `onnxruntime-cpu`: INT8 static Q/DQ with uint8 asymmetric activations and int8 symmetric per-channel
  weights (ONNX Runtime's x86 kernels are fast for u8·s8); `com.microsoft.MatMulNBits` for weight-only
  INT8/INT4 (`accuracy_level` 4 computes with int8 activations inside the kernel).
- `tensorrt`: standard ONNX only, TensorRT's explicit-quantization rules: INT8 symmetric activations and
  weights (zero point 0), float biases; INT4 as opset-21 blocked `DequantizeLinear` + `MatMul`, symmetric.
  Every artifact for this target is checked against those rules on CPU (`compress.checks.tensorrt`).
- `onnxruntime-genai` (int4, and int8 weight-only; causal-lm only): onnxruntime-genai's model builder writes
  its fused decoder graph (GroupQueryAttention, packed QKV, MatMulNBits, a tied embedding stored once) from
  our quantized weights (`compress.genai.build`); `execution_provider: cuda` builds the GPU graph (fp16 I/O)
  on any machine.

The INT4 rewrite of an exported graph for either target is `onnx_rewrite`.

```yaml
target: tensorrt                                  # shorthand for {name: tensorrt}
target: {name: onnxruntime-cpu, accuracy_level: 0}
target: {name: onnxruntime-genai, execution_provider: cuda}
```
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from compress.quant.registry import NamedOptions, registry
from compress.quant.vocab import TARGETS
from compress.schema import Count

#: ONNX Runtime session entry: run Q/DQ pairs as written (no fusion into integer kernels)
DISABLE_QDQ_FUSION = "session.disable_quant_qdq"
#: ONNX Runtime session entry that keeps DQ+MatMul fusions at float compute (what TensorRT does)
ORT_QDQ_ACCURACY = "session.qdq_matmulnbits_accuracy_level"


class TargetOptions(NamedOptions):
    """Keys every target takes: how a torch artifact is exported before the INT4 rewrite."""

    opset: Count | None = Field(None, ge=13, le=23, description="int4: export opset (default: the target's)")
    dynamo: bool = Field(False, description="int4: export with the torch.export-based exporter (opset >= 18)")

    #: export opset when `opset` is not given
    default_opset: ClassVar[int] = 17
    #: the target runs com.microsoft contrib ops (MatMulNBits, GatherBlockQuantized, MatMulInteger)
    contrib_ops: ClassVar[bool] = True
    #: int8 static: activations int8 symmetric (else uint8 asymmetric) and biases left float
    symmetric_activations: ClassVar[bool] = False
    #: INT4 weights need symmetric codes (no zero point)
    symmetric_int4: ClassVar[bool] = False
    #: the flavour `onnx_rewrite.rewrite_onnx_file(target=...)` writes
    rewrite: ClassVar[str] = "onnxruntime"
    #: check the artifact against TensorRT's Q/DQ rules
    tensorrt_rules: ClassVar[bool] = False
    #: the artifact is onnxruntime-genai's builder output (from torch; no export + rewrite, no `opset`/`dynamo`)
    fused_decoder: ClassVar[bool] = False

    @property
    def export_opset(self) -> int:
        return self.opset if self.opset is not None else self.default_opset

    def int8_session_config(self) -> dict[str, str]:
        """ONNX Runtime session entries that make a CPU evaluation compute what this target computes."""
        return {}

    def int4_session_config(self) -> dict[str, str]:
        return {}


class OnnxruntimeCpu(TargetOptions):
    """ONNX Runtime on CPU: MatMulNBits / u8·s8 Q/DQ."""

    name: Literal["onnxruntime-cpu"] = "onnxruntime-cpu"
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4, description="MatMulNBits compute type (0 = float, 4 = int8 activations); weight-only int8 and int4"
    )


class TensorRT(TargetOptions):
    """TensorRT (explicit quantization): standard Q/DQ only."""

    name: Literal["tensorrt"] = "tensorrt"
    # the highest opset the TorchScript exporter writes; the rewrite raises a graph at 18..20 to 21
    default_opset: ClassVar[int] = 20
    contrib_ops: ClassVar[bool] = False
    symmetric_activations: ClassVar[bool] = True
    symmetric_int4: ClassVar[bool] = True
    rewrite: ClassVar[str] = "tensorrt"
    tensorrt_rules: ClassVar[bool] = True

    def int8_session_config(self) -> dict[str, str]:
        # evaluate on CPU what TensorRT computes (float ops between Q/DQ), not ORT's integer kernels
        return {DISABLE_QDQ_FUSION: "1"}

    def int4_session_config(self) -> dict[str, str]:
        # ORT would fuse DQ+MatMul into MatMulNBits with int8 activations; TensorRT computes in float
        return {ORT_QDQ_ACCURACY: "0"}


class OnnxruntimeGenai(TargetOptions):
    """onnxruntime-genai's fused decoder graph, built by its model builder from our INT4 / INT8 weights."""

    name: Literal["onnxruntime-genai"] = "onnxruntime-genai"
    execution_provider: Literal["cpu", "cuda"] = Field(
        "cpu", description="graph flavour: cpu (fp32 I/O) or cuda (fp16 I/O; built here, run on an NVIDIA GPU only)"
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = Field(
        None, description="MatMulNBits compute type; default the builder's (4 on cpu, 0 on cuda)"
    )
    prune_lm_head: bool = Field(
        True,
        description="the head computes the last position only (the builder's prune_lm_head): a prompt's forward "
        "runs it once, not per token; the logits the Generator uses are the same; evaluation runs the file token by "
        "token for full-sequence logits",
    )
    fused_decoder: ClassVar[bool] = True

    @property
    def runs_on_cpu(self) -> bool:
        """Whether this machine's CPU session can evaluate and benchmark the graph (the cuda one needs a GPU)."""
        return self.execution_provider == "cpu"


TARGET_OPTIONS = registry((OnnxruntimeCpu, TensorRT, OnnxruntimeGenai), TARGETS)
