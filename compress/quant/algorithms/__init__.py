"""Quantization algorithms, each an options model registered by name (`method:` of the quantize stage).

INT4 (torch side, weight-only): `rtn`, `gptq`, `awq`, `autoround` (Intel's auto-round package, decoder LLMs),
`checkpoint` (an AutoGPTQ/GPTQModel folder).
INT8 (ONNX side): `static` (calibrated Q/DQ), `weight-only` (MatMulNBits, 8 bits), `dynamic` (W8A8);
`smoothquant` (torch side: SmoothQuant scales folded into the decoder, then the dynamic W8A8 export).
The math lives in this package's modules (`rtn`, `gptq`, `awq`, `checkpoint`, `sequential`,
`int8_matmul`, `smoothquant`); importing this package loads only these options models.

```yaml
method: gptq                                        # shorthand for {name: gptq}
method: {name: gptq, damp: 0.02, act_order: false, samples: 32}
method: {name: static, calibrator: percentile, samples: 512}
```
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from compress.quant.registry import NamedOptions, registry
from compress.quant.vocab import INT4_ALGORITHMS, INT8_METHODS, Activations
from compress.schema import Count, Real

#: 7-bit weights for ONNX Runtime's CPU integer kernels; `auto` resolves, when the options are validated, to
#: true on a CPU without VNNI (where u8·s8 int16 pair sums saturate: ORT's documented remedy) and false
#: elsewhere or for a TensorRT target, and the resolved value is what the cache key and report record.
ReduceRange = bool | Literal["auto"]
REDUCE_RANGE = Field(
    "auto", description="7-bit weights (avoids u8·s8 saturation on CPUs without VNNI); auto: true on such a CPU"
)
ACTIVATIONS = Field(
    "tensor",
    description="activation scales: tensor (one per MatMul input, DynamicQuantizeLinear) | token (one per "
    "token, compress.quant.algorithms.int8_per_token)",
)


class RtnOptions(NamedOptions):
    """Round to nearest: no calibration data."""

    name: Literal["rtn"] = "rtn"


class GptqOptions(NamedOptions):
    """GPTQ (arXiv 2210.17323): second-order, layer by layer on calibration data."""

    name: Literal["gptq"] = "gptq"
    act_order: bool = Field(True, description="columns by decreasing Hessian diagonal (groups kept contiguous)")
    damp: Real = Field(0.01, gt=0, le=1, description="dampening added to diag(H), fraction of its mean")
    samples: Count = Field(16, gt=0, description="calibration windows (causal-lm) or images (vision)")


class AwqOptions(NamedOptions):
    """AWQ (arXiv 2306.00978): activation-aware scales folded into the op before each Linear."""

    name: Literal["awq"] = "awq"
    then: Literal["rtn", "gptq"] = Field("rtn", description="quantizer applied to the scaled weights")
    samples: Count = Field(16, gt=0, description="calibration windows (causal-lm) or images (vision)")


class AutoRoundOptions(NamedOptions):
    """AutoRound (arXiv 2309.05516): sign-gradient tuning of rounding and clipping per decoder block
    (the `auto-round` package, `autoround` extra; decoder LLMs only)."""

    name: Literal["autoround"] = "autoround"
    iters: Count = Field(200, gt=0, description="tuning steps per decoder block (the paper's 200)")
    lr: Real | None = Field(None, gt=0, description="learning rate; default 1 / iters")
    amp: bool = Field(False, description="tune under bfloat16 autocast (faster on AMX CPUs); float32 when off")
    samples: Count = Field(16, gt=0, description="calibration windows")


class CheckpointOptions(NamedOptions):
    """Export the codes, scales and zero points of an AutoGPTQ / GPTQModel folder as they are."""

    name: Literal["checkpoint"] = "checkpoint"
    folder: str = Field(description="the GPTQ folder (`quantize_config.json` + `*.safetensors`), relative to the cwd")


class StaticOptions(NamedOptions):
    """Calibrated Q/DQ (`onnxruntime.quantization.quantize_static`): activations quantized too."""

    name: Literal["static"] = "static"
    calibrator: Literal["minmax", "entropy", "percentile", "per-tensor"] = Field(
        "minmax",
        description="how ranges are chosen; per-tensor: each tensor the one of the three with the least "
        "8-bit error on the calibration samples (compress.quant.range_choice)",
    )
    percentile: Real = Field(99.999, gt=90, le=100, description="percentile calibrator: range kept")
    samples: Count = Field(256, gt=0, description="calibration samples drawn from data.calibration")
    per_channel: bool = Field(True, description="per-channel weight scales")
    reduce_range: ReduceRange = REDUCE_RANGE
    exclude_nodes: tuple[str, ...] = Field((), description="node names kept in float")
    op_types: tuple[str, ...] | None = Field(
        None, description="only quantize these op types (default: all ORT supports)"
    )
    bias_correction: bool = Field(
        False,
        description="shift each quantized Conv/Gemm bias by its mean output error on the calibration samples "
        "(compress.quant.bias_correction)",
    )


class WeightOnlyOptions(NamedOptions):
    """`MatMulNBits` with 8-bit blocked weights (blocks of the scheme's `group_size`)."""

    name: Literal["weight-only"] = "weight-only"


class DynamicOptions(NamedOptions):
    """W8A8 with dynamic activation scales (`quantize_dynamic`, MatMul only), per tensor or per token."""

    name: Literal["dynamic"] = "dynamic"
    per_channel: bool = Field(True, description="per-channel weight scales")
    reduce_range: ReduceRange = REDUCE_RANGE
    activations: Activations = ACTIVATIONS


class SmoothQuantOptions(NamedOptions):
    """SmoothQuant (arXiv 2211.10438) on the torch decoder, then dynamic W8A8 (`quantize_dynamic`)."""

    name: Literal["smoothquant"] = "smoothquant"
    alpha: float | Literal["auto"] = Field(
        "auto",
        description="share of the activation range moved into the weights, in [0, 1]; auto: searched per "
        "scale group on the calibration windows (0.3..0.95, or no smoothing)",
    )
    samples: Count = Field(16, gt=0, description="calibration windows")
    per_channel: bool = Field(True, description="per-channel weight scales")
    reduce_range: ReduceRange = REDUCE_RANGE
    activations: Activations = ACTIVATIONS

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha(cls, value: Any) -> Any:
        ok = value == "auto" or (
            isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= float(value) <= 1.0
        )
        if not ok:
            raise ValueError(f"alpha = {value!r}; allowed: auto or a number in [0, 1] (e.g. 0.5)")
        return value


INT4 = registry((RtnOptions, GptqOptions, AwqOptions, AutoRoundOptions, CheckpointOptions), INT4_ALGORITHMS)
INT8 = registry((StaticOptions, WeightOnlyOptions, DynamicOptions, SmoothQuantOptions), INT8_METHODS)
#: algorithms that read calibration data
CALIBRATED = frozenset({"gptq", "awq", "autoround", "static", "smoothquant"})
