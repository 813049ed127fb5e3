"""INT8, mostly on the ONNX side. Four methods (`compress.quant.algorithms`, each with its own keys under
`method: {name: ...}`); `auto` asks the adapter (vision: static, causal-lm: weight-only, text-encoder: dynamic):

- `static`: calibrated Q/DQ with `onnxruntime.quantization.quantize_static` (CNNs: activations are
  quantized too, and ONNX Runtime runs the convolutions in INT8).
  `bias_correction: true` then shifts each quantized Conv / Gemm bias by its mean output error on the
  calibration samples (`compress.quant.bias_correction`, our code: neither ORT nor NNCF does it to this graph).
  `qat: {steps, lr, batch_size}` (from the torch model: `input: finetune`) first fine-tunes it with fake-quant
  in ORT's arithmetic on data.train, exports it and quantizes that graph the same way (`int8_qat`).
- `weight-only`: `MatMulNBits` with 8-bit weights in groups of the scheme's `group_size` (the target's
  `accuracy_level` 4 computes with INT8
  activations inside the kernel). For decoder LLMs it decodes fastest and keeps perplexity: measured on
  SmolLM2-135M, dynamic W8A8 raised perplexity by 58% where weight-only raised it by < 1%.
  `sensitivity: {windows}` / `accuracy_budget: {max_rise, ...}` rank its MatMuls in ONNX Runtime and return
  the most sensitive to float until a perplexity budget holds (`int8_lm_budget`).
- `dynamic`: W8A8 with dynamic activation scales (`quantize_dynamic`, MatMul only; ONNX Runtime's
  DynamicQuantizeLinear takes one scale per activation tensor, i.e. per prefill; `activations: token`
  gives each token its own, `compress.quant.algorithms.int8_per_token`).
- `smoothquant` (causal-lm, from the torch model): SmoothQuant's per-channel scales folded into the
  decoder (`compress.quant.algorithms.smoothquant`), exported, then `dynamic` (`int8_smooth`).

Transformers (a graph with LayerNormalization or Softmax: ViTs, ConvNeXt) get Q/DQ on MatMul / Gemm /
Conv only: LayerNorm, Softmax, GELU (Erf) and the residual Adds stay float, because 8-bit per-tensor
ranges are where such models lose their accuracy (LayerNorm inputs carry outlier channels, Softmax spans
orders of magnitude) and neither ONNX Runtime nor TensorRT runs those ops faster in INT8. The artifact's
info lists the op types left float (`float_op_types`, node counts) and `report.md` says why.

The static Q/DQ flavour follows the deployment target (`compress.quant.targets`), because the two disagree
(measured on this CPU with MobileNetV2, see README):
- `onnxruntime-cpu`: uint8 asymmetric activations, int8 symmetric per-channel weights. ONNX Runtime's
  x86 kernels (VNNI) are fast for u8·s8; symmetric s8 activations were slower than FP32 here.
- `tensorrt`: int8 symmetric activations (per-tensor) and weights (per-channel), zero point 0 — TensorRT's
  explicit-quantization rules. Every artifact for this target is checked against those rules on CPU.
  On CPU such an artifact is evaluated with ONNX Runtime's Q/DQ fusion off (`session.disable_quant_qdq`):
  each DequantizeLinear feeds a float op, which is the arithmetic TensorRT's int8 kernels reproduce (int32
  accumulation). ORT's own integer kernels would measure something else: on a CPU without VNNI they
  saturate (below), which cost a tiny CNN 12 points of agreement with its FP32 graph where the float
  simulation lost 4. Its CPU latency is therefore not an int8 latency (the report says so).

On an x86 CPU without VNNI (AVX2 only) ONNX Runtime computes u8·s8 with VPMADDUBSW, whose int16 pair sums
saturate (a tiny CNN's static INT8 logits: 8.5% relative error here against ~1% on a VNNI CPU; dynamic
W8A8 on a tiny Llama: 10-22% of the logit range against 1-3% with 7-bit weights). ORT's documented remedy
is `reduce_range` (7-bit weights): `reduce_range: auto` (the default of static and dynamic) turns it on
when the stage runs on such a CPU for an ONNX Runtime target, and the resolved value is recorded
(`info.reduce_range`, cache key). Set it `false` to build for a VNNI CPU elsewhere (then measure there).

The input must be float (an INT4 or INT8 artifact is refused, at validate time where the plan shows it),
and the output must hold quantized nodes: weight-only and dynamic quantize MatMul weights only, so on a
CNN they would write the float graph back; the stage fails instead and says to use `static`. Models over
~1.8 GB (or read from external data) are written as `model.onnx` + `model.onnx.data`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, Discriminator, Field, Tag, field_validator, model_validator

from compress.backends import ORT_SESSION_CONFIG
from compress.bench.harness import int8_dot_saturates
from compress.errors import StageError
from compress.onnx_files import data_file, wants_external_data
from compress.progress import quiet_third_party
from compress.quant import algorithms, targets
from compress.quant.bias_correction import VERSION as BIAS_CORRECTION_VERSION
from compress.quant.calibration import CALIBRATOR_OPTIONS, CHOICES_FILE, QdqRecipe, compute_ranges, passes
from compress.quant.range_choice import CANDIDATES
from compress.quant.range_choice import VERSION as RANGE_CHOICE_VERSION
from compress.quant.registry import NamedOptions, named
from compress.quant.scheme import GroupSize
from compress.quant.vocab import AUTO, INT8_METHODS, LmHead
from compress.stages.base import StageContext, StageOptions, StageOutput
from compress.stages.quantize.common import (
    TargetField,
    input_problem,
    refuse_flat_keys,
    refuse_quantized_input,
    require_quantized,
)
from compress.stages.quantize.fallback import AccuracyBudget, SensitivityOptions, budget_search, overlap_problem
from compress.stages.quantize.int8_genai import UnitGroupSizes
from compress.stages.quantize.int8_lm_budget import VERSION as DECODER_SEARCH_VERSION
from compress.stages.quantize.int8_lm_budget import PerplexityBudget, WindowSensitivity
from compress.stages.quantize.int8_lm_budget import refusals as lm_budget_refusals
from compress.stages.quantize.int8_qat import VERSION as QAT_VERSION
from compress.stages.quantize.int8_qat import QatOptions

if TYPE_CHECKING:
    from compress.families.base import Adapter


class AutoMethod(NamedOptions):
    """`method: auto`: the family's default INT8 method (`Adapter.default_int8_method`) with its defaults."""

    name: Literal["auto"] = AUTO


_METHODS = {AUTO: AutoMethod, **algorithms.INT8}
Int8MethodField = Annotated[
    AutoMethod
    | algorithms.StaticOptions
    | algorithms.WeightOnlyOptions
    | algorithms.DynamicOptions
    | algorithms.SmoothQuantOptions,
    Field(discriminator="name"),
    BeforeValidator(named(_METHODS, "method")),
]


def _by_key(key: str) -> Any:
    """A discriminator: the decoder variant (windows, perplexity) when the mapping holds `key`."""

    def pick(value: Any) -> str:
        if isinstance(value, dict):
            return "decoder" if key in value else "static"
        return "decoder" if isinstance(value, (WindowSensitivity, PerplexityBudget)) else "static"

    return Discriminator(pick)


#: static counts calibration samples and a metric drop; weight-only (decoders) windows and a perplexity rise
SensitivityField = Annotated[
    Annotated[SensitivityOptions, Tag("static")] | Annotated[WindowSensitivity, Tag("decoder")], _by_key("windows")
]
BudgetField = Annotated[
    Annotated[AccuracyBudget, Tag("static")] | Annotated[PerplexityBudget, Tag("decoder")], _by_key("max_rise")
]
#: scheme keys and the methods they apply to
_APPLIES = {
    "group_size": ("weight-only",),
    "lm_head": ("weight-only", "dynamic", "static", "smoothquant"),
    "sensitivity": ("static", "weight-only"),
    "accuracy_budget": ("static", "weight-only"),
    "qat": ("static",),
}


class Int8Options(StageOptions):
    """INT8 of an ONNX artifact: calibrated static Q/DQ, weight-only MatMulNBits or dynamic W8A8.

    ```yaml
    - quantize: {precision: int8, method: {name: static, calibrator: percentile, samples: 512}, target: tensorrt}
    - quantize: {precision: int8, method: weight-only, group_size: 32}
    - quantize: {precision: int8, method: {name: smoothquant, alpha: auto}, input: source}
    ```
    """

    precision: Literal["int8"]
    method: Int8MethodField = Field(
        AutoMethod(),
        description="auto (the family's best: vision static, causal-lm weight-only, text-encoder dynamic) | "
        "static | weight-only | dynamic | smoothquant (from the torch model), or a mapping {name: ..., <its keys>}",
    )
    target: TargetField = Field(
        targets.OnnxruntimeCpu(),
        description="onnxruntime-cpu | tensorrt (from an ONNX artifact) | onnxruntime-genai (weight-only, causal-lm, "
        "from the torch model: its builder's fused decoder), or a mapping",
    )
    group_size: GroupSize = Field(32, description="weight-only: weights per scale along K")
    group_sizes: UnitGroupSizes = Field(
        default_factory=dict,
        description="target onnxruntime-genai: per-unit group sizes {Linear name or suffix: group}, e.g. "
        "{mlp.down_proj: 512}; each must divide the unit's in-features (stages/quantize/int8_genai.py)",
    )
    lm_head: LmHead = Field("int8", description="output projection: int8 (quantized like the rest) or float")
    sensitivity: SensitivityField | None = Field(
        None,
        description="static: {samples}: per-node sensitivity on held-apart calibration samples "
        "(stages/quantize/fallback.py); weight-only (decoders): {windows}: per-MatMul KL on calibration windows "
        "(stages/quantize/int8_lm_budget.py)",
    )
    accuracy_budget: BudgetField | None = Field(
        None,
        description="static: {max_drop, max_fallback, samples, start, sigmas}: return the most sensitive nodes to "
        "float until the primary metric's drop on `samples` held-apart calibration samples fits "
        "(stages/quantize/fallback.py); weight-only (decoders): {max_rise, max_fallback, windows, start, sigmas}: "
        "likewise MatMuls, by the perplexity rise (%) on held-apart calibration windows (int8_lm_budget.py)",
    )
    qat: QatOptions | None = Field(
        None,
        description="static, from the torch model: {steps, lr, batch_size, weight_decay, warmup}: fake-quant "
        "fine-tune on data.train in ORT's arithmetic, then export and static Q/DQ (stages/quantize/int8_qat.py)",
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_keys(cls, data: Any) -> Any:
        return refuse_flat_keys(data, cls.model_fields, algorithms.INT8)

    @property
    def accepts(self) -> frozenset[str]:  # type: ignore[override] - the target decides (StageOptions.accepts)
        """ONNX for the ONNX Runtime / TensorRT rewrites; the torch model for onnxruntime-genai's builder and for
        smoothquant (its scales are folded into the torch decoder before export)."""
        from_torch = (
            self.target.fused_decoder or isinstance(self.method, algorithms.SmoothQuantOptions) or self.qat is not None
        )
        return frozenset({"torch"}) if from_torch else frozenset({"onnx"})

    @property
    def needs_train_data(self) -> bool:  # type: ignore[override] - qat decides (StageOptions.needs_train_data)
        """`qat` trains on data.train (its hash then joins the cache key)."""
        return self.qat is not None

    def output_format(self, input_format: str) -> str:
        return "onnx"

    def check_plan(self, earlier: dict[str, str]) -> list[tuple[str, str]]:
        """`qat` fine-tunes the torch model: an input named as an ONNX artifact is refused with what to name."""
        if self.qat is not None and self.input is not None and earlier.get(self.input) == "onnx":
            torch_ones = [name for name, fmt in earlier.items() if fmt == "torch"]
            return [
                (
                    "input",
                    f"qat fine-tunes the torch model, and '{self.input}' is ONNX; set input: to a torch artifact "
                    f"({', '.join(torch_ones)}), e.g. the finetune the export came from",
                )
            ]
        return []

    @field_validator("lm_head")
    @classmethod
    def _lm_head(cls, value: str) -> str:
        if value == "int4":
            raise ValueError(
                "precision int8 quantizes the output projection at 8 bits or not at all; allowed: float, int8"
            )
        return value

    @model_validator(mode="after")
    def _resolve_reduce_range(self) -> Int8Options:
        """`reduce_range: auto` -> a bool for this CPU and target (see the module docstring)."""
        if getattr(self.method, "reduce_range", None) == "auto":
            on = bool(not self.target.int8_session_config() and int8_dot_saturates())
            # the options are frozen once validated; this validator is the last step of building them
            object.__setattr__(self, "method", self.method.model_copy(update={"reduce_range": on}))
        return self

    def cache_fields(self) -> dict[str, Any]:
        """`method: auto` resolves `reduce_range` only when the family is known: this CPU's answer joins the key;
        the entropy calibrator's bins too."""
        fields = super().cache_fields()
        if getattr(self.method, "bias_correction", None) is False:  # the key of every graph made before it existed
            del fields["method"]["bias_correction"]
        elif getattr(self.method, "bias_correction", None):
            fields["bias_correction_version"] = BIAS_CORRECTION_VERSION
        if getattr(self.method, "activations", None) == "tensor":  # the key of every W8A8 graph made before it
            del fields["method"]["activations"]
        if getattr(self.method, "alpha", None) == "auto":  # the grid searched is part of what made the graph
            from compress.quant.algorithms.smoothquant import ALPHA_GRID

            fields["smoothquant_alpha_grid"] = list(ALPHA_GRID)
        if getattr(self.method, "calibrator", None) in ("entropy", "per-tensor"):  # before its bins: minmax
            fields["entropy_bins"] = CALIBRATOR_OPTIONS["entropy"]
        if getattr(self.method, "calibrator", None) == "per-tensor":
            fields["range_choice_version"] = RANGE_CHOICE_VERSION
        if self.target.fused_decoder:
            from compress.genai.rewrite import GRAPH_REWRITE
            from compress.stages.quantize.genai_target import genai_version

            fields["onnxruntime_genai"] = genai_version()  # its builder writes the graph
            fields["genai_rewrite"] = GRAPH_REWRITE  # and our fixes of it
        if self.qat is None:  # the key of every int8 artifact made before qat existed
            del fields["qat"]
        else:
            fields["qat_version"] = QAT_VERSION
        if isinstance(self.method, algorithms.WeightOnlyOptions) and (self.sensitivity or self.accuracy_budget):
            fields["decoder_search_version"] = DECODER_SEARCH_VERSION
        if not self.group_sizes:  # the key of every int8 artifact made before per-unit groups existed
            del fields["group_sizes"]
        if isinstance(self.method, AutoMethod):
            fields["auto_reduce_range"] = bool(not self.target.int8_session_config() and int8_dot_saturates())
        return fields

    def method_for(self, family_default: str) -> algorithms.NamedOptions:
        """The method's options, `auto` resolved to the family's default (with that method's defaults)."""
        if not isinstance(self.method, AutoMethod):
            return self.method
        resolved = Int8Options(precision="int8", method=family_default, target=self.target)
        return resolved.method

    def check_family(self, adapter: type[Adapter]) -> list[tuple[str, str]]:
        """Keys that do not apply to the method (with `auto` resolved for this family) are refused."""
        method = self.method_for(adapter.default_int8_method).name
        problems = [
            (key, f"applies to method {' / '.join(methods)} only (method is {method}); remove it")
            for key, methods in _APPLIES.items()
            if key in self.model_fields_set and method not in methods
        ]
        if method not in adapter.int8_methods:
            allowed = ", ".join(m for m in INT8_METHODS if m in adapter.int8_methods)
            problems.append(("method", f"{method}: not for family '{adapter.family}'; allowed: {allowed}"))
        resolved = self.method_for(adapter.default_int8_method)
        if isinstance(resolved, algorithms.StaticOptions):
            problems += self._static_search_problems(adapter, resolved)
        elif method == "weight-only":
            problems += self._decoder_search_problems(adapter)
        problems += self._qat_problems(adapter, method)
        if self.group_sizes and not self.target.fused_decoder:
            problems.append(
                ("group_sizes", f"applies to target onnxruntime-genai only (target is {self.target.name}); remove it")
            )
        if self.target.fused_decoder:
            if self.target.name not in adapter.int4_targets:
                problems.append(("target", f"{self.target.name}: not for family '{adapter.family}' (decoder LLMs)"))
            if method != "weight-only":
                problems.append(("method", f"target {self.target.name} takes weight-only int8 (method is {method})"))
            if self.lm_head == "float":
                problems.append(
                    (
                        "lm_head",
                        f"target {self.target.name} quantizes every float MatMul itself (its 4-bit RTN), so a "
                        "float lm_head cannot stay float there; allowed: int8",
                    )
                )
        for key in ("opset", "dynamo"):
            if key in self.target.model_fields_set and method != "smoothquant" and self.qat is None:  # they export
                problems.append(("target", f"{key}: int8 starts from an ONNX artifact (opset is export's); remove it"))
        if "accuracy_level" in self.target.model_fields_set and method != "weight-only":
            problems.append(("target", f"accuracy_level applies to method weight-only only (method is {method})"))
        if method != "static" and not self.target.contrib_ops:
            problems.append(
                ("method", f"method {method} writes com.microsoft ops that {self.target.name} cannot build; use static")
            )
        return problems

    def _static_search_problems(
        self, adapter: type[Adapter], method: algorithms.StaticOptions
    ) -> list[tuple[str, str]]:
        """Static INT8's search counts labelled calibration samples and a metric drop."""
        problems = []
        if isinstance(self.sensitivity, WindowSensitivity):
            problems.append(("sensitivity", "static INT8 counts calibration samples: write {samples: N}"))
        if isinstance(self.accuracy_budget, PerplexityBudget):
            problems.append(
                ("accuracy_budget", f"static INT8 bounds the {adapter.quality.name} drop: write {{max_drop: ...}}")
            )
        if self.accuracy_budget is not None and not adapter.labelled_calibration:
            problems.append(("accuracy_budget", f"family {adapter.family} has no labelled calibration slice"))
        if isinstance(self.accuracy_budget, AccuracyBudget) and not isinstance(self.sensitivity, WindowSensitivity):
            sensitivity = self.sensitivity or SensitivityOptions()
            if (overlap := overlap_problem(self.accuracy_budget, method.samples, sensitivity)) is not None:
                problems.append(("accuracy_budget", overlap))
        return problems

    def decoder_sensitivity(self) -> WindowSensitivity:
        """Weight-only's sensitivity options (`sensitivity: {}` or absent: the defaults)."""
        return self.sensitivity if isinstance(self.sensitivity, WindowSensitivity) else WindowSensitivity()

    def _decoder_search_problems(self, adapter: type[Adapter]) -> list[tuple[str, str]]:
        """Weight-only INT8's search: decoders, windows and a perplexity rise, our own graph."""
        if self.sensitivity is None and self.accuracy_budget is None:
            return []
        if adapter.session_kind != "decoder":
            return [
                (
                    key,
                    f"weight-only INT8 searches decoder LLMs only (by perplexity); family {adapter.family} has none",
                )
                for key in ("sensitivity", "accuracy_budget")
                if getattr(self, key) is not None
            ]
        problems = []
        if isinstance(self.sensitivity, SensitivityOptions) and self.sensitivity.model_fields_set:
            problems.append(("sensitivity", "a decoder's sensitivity counts calibration windows: write {windows: N}"))
        if isinstance(self.accuracy_budget, AccuracyBudget):
            problems.append(
                ("accuracy_budget", "a decoder's budget is a perplexity rise: write {max_rise: <%>, windows: N}")
            )
        if self.target.fused_decoder:
            problems += [
                (key, f"applies to our own ONNX graph (target onnxruntime-cpu), not to target {self.target.name}")
                for key in ("sensitivity", "accuracy_budget")
                if getattr(self, key) is not None
            ]
        if isinstance(self.accuracy_budget, PerplexityBudget):
            problems += lm_budget_refusals(self.accuracy_budget, self.decoder_sensitivity())
        return problems

    def _qat_problems(self, adapter: type[Adapter], method: str) -> list[tuple[str, str]]:
        """`qat` needs a family with training data and a task loss, and does not compose with the search."""
        if self.qat is None or method != "static":  # a non-static method is refused by _APPLIES
            return []
        problems = []
        if "finetune" not in adapter.stage_kinds:
            problems.append(
                (
                    "qat",
                    f"family {adapter.family} has no training data or task loss for a fine-tune (qat trains like "
                    "finetune: families that take finetune only); remove qat",
                )
            )
        for key in ("sensitivity", "accuracy_budget"):
            if getattr(self, key) is not None:
                problems.append(
                    (
                        key,
                        "does not compose with qat yet: the search's float reference would be the QAT model's "
                        "graph, not the input's; run it in a stage of its own, or remove qat",
                    )
                )
        static = self.method_for(adapter.default_int8_method)
        for key in ("exclude_nodes", "op_types"):
            if getattr(static, key, None):
                problems.append(
                    (
                        "qat",
                        f"method.{key} names ONNX nodes / op types that qat cannot map to torch modules (it "
                        f"fake-quantizes every Conv / Linear); remove {key} or qat",
                    )
                )
        return problems

    def output_precision(self, input_precision: str) -> str:
        return "int8"

    def input_precision_problem(self, name: str, precision: str) -> str | None:
        return input_problem(name, precision, "quantize int8")


#: what to do when a method quantized nothing
_NOTHING_QUANTIZED = {
    "static": "check op_types and exclude_nodes",
    "weight-only": "weight-only quantizes MatMul weights only; use method: static",
    "dynamic": "dynamic quantizes MatMul weights only; use method: static",
    "smoothquant": "smoothquant quantizes MatMul weights only; use method: static",
}


def quantize_int8(artifact, options: Int8Options, ctx: StageContext) -> StageOutput:
    refuse_quantized_input(artifact, "quantize int8")
    if options.target.fused_decoder:  # from the torch model (`accepts`); the method was checked at validate
        from compress.stages.quantize.int8_genai import quantize_int8_genai

        return quantize_int8_genai(artifact, options, ctx)
    method = options.method_for(ctx.adapter.default_int8_method)
    if isinstance(method, algorithms.SmoothQuantOptions):  # from the torch model (`accepts`)
        from compress.stages.quantize.int8_smooth import quantize_int8_smooth

        return quantize_int8_smooth(artifact, options, method, ctx)
    if options.qat is not None:  # from the torch model (`accepts`); the method was checked at validate
        from compress.stages.quantize.int8_qat import quantize_int8_qat

        return quantize_int8_qat(artifact, options, method, ctx)
    if isinstance(method, algorithms.StaticOptions):
        out = _static(artifact, options, method, ctx)
    else:
        out = _matmul(artifact, options, method, ctx)
    nodes = require_quantized(
        ctx.outdir / out.file, artifact.main, f"quantize int8 ({method.name})", _NOTHING_QUANTIZED[method.name]
    )
    out.info["quantized_nodes"] = nodes
    return out


def _matmul(artifact, options: Int8Options, method: algorithms.NamedOptions, ctx: StageContext) -> StageOutput:
    """Weight-only (MatMulNBits) or dynamic (MatMulInteger) INT8 of the MatMul weights."""
    target = options.target
    if not target.contrib_ops:
        raise StageError(
            f"quantize int8: method '{method.name}' writes com.microsoft ops that {target.name} cannot build; "
            f"use method: static for target: {target.name}"
        )
    from compress.quant.algorithms.int8_matmul import (
        ACTIVATION_INFO,
        quantize_dynamic_int8,
        quantize_weight_only_int8,
    )

    start = time.perf_counter()
    out = ctx.outdir / "model.onnx"
    head = options.lm_head == "int8"
    with ctx.reporter.task(f"quantize int8 ({method.name})", total=None):
        if isinstance(method, algorithms.WeightOnlyOptions):
            level = getattr(target, "accuracy_level", None)
            info = {
                "weights": f"int8 symmetric, groups of {options.group_size} (MatMulNBits)",
                "group_size": options.group_size,
                "accuracy_level": level,
            }
            if options.sensitivity is None and options.accuracy_budget is None:
                quantize_weight_only_int8(
                    artifact.main, out, group_size=options.group_size, accuracy_level=level, lm_head=head
                )
            else:
                info.update(_searched(artifact, out, options, level, ctx))
        else:
            quantize_dynamic_int8(
                artifact.main,
                out,
                per_channel=method.per_channel,
                lm_head=head,
                reduce_range=method.reduce_range,
                activations=method.activations,
            )
            info = {
                "weights": "int8 per-channel" + (" (7-bit range)" if method.reduce_range else ""),
                "activations": ACTIVATION_INFO[method.activations],
                "reduce_range": method.reduce_range,
            }
    info.update(method=method.name, seconds=round(time.perf_counter() - start, 1), lm_head=options.lm_head)
    if isinstance(method, algorithms.WeightOnlyOptions):
        from compress.stages.quantize.common import op_counts

        tied = op_counts(out).get("GatherBlockQuantized")  # int8_tied: the gather reads the 8-bit head's codes
        info["embedding"] = "tied: the lm_head's 8-bit codes (GatherBlockQuantized)" if tied else "float"
    return StageOutput(file="model.onnx", format="onnx", precision="int8", info=info, target=target.name)


def _searched(artifact, out: Path, options: Int8Options, level: int | None, ctx: StageContext) -> dict[str, Any]:
    """Weight-only INT8 of a decoder with its sensitivity and accuracy budget (stages/quantize/int8_lm_budget.py)."""
    from compress.hashing import sha256_json
    from compress.quant.algorithms.int8_matmul import weight_only_int8_model
    from compress.stages.quantize.int8_lm_budget import budget_search

    src = artifact.main
    quantized = weight_only_int8_model(
        src, group_size=options.group_size, accuracy_level=level, lm_head=options.lm_head == "int8"
    )
    budget = options.accuracy_budget
    assert budget is None or isinstance(budget, PerplexityBudget)  # check_family refused the other
    table_key = sha256_json(  # what the graph and the sensitivity windows depend on; not the budget
        {
            "artifact": [artifact.key, artifact.content_digest],
            "options": {k: v for k, v in options.cache_fields().items() if k != "accuracy_budget"},
            "calibration": ctx.adapter.data_hashes().get("calibration"),
        }
    )
    return budget_search(
        quantized,
        src,
        out,
        options.decoder_sensitivity(),
        budget,
        ctx,
        external=wants_external_data(src),
        table_key=table_key,
    )


def _static(artifact, options: Int8Options, method: algorithms.StaticOptions, ctx: StageContext) -> StageOutput:
    """Calibrated Q/DQ in the target's flavour; a transformer's LayerNorm / Softmax / GELU stay float."""
    transformer = None if method.op_types else _transformer_op_types(artifact.main)
    if transformer:
        method = method.model_copy(update={"op_types": tuple(transformer)})
    exclude = list(method.exclude_nodes)
    if options.lm_head == "float":
        from compress.quant.algorithms.int8_matmul import lm_head_nodes

        exclude += lm_head_nodes(artifact.main)
    target = options.target
    out = ctx.outdir / "model.onnx"
    start = time.perf_counter()
    recipe = _calibrate_static(artifact.main, method, target, exclude, transformer, ctx)
    seconds = round(time.perf_counter() - start, 1)
    choices = recipe.cache.parent / CHOICES_FILE
    if choices.is_file():  # calibrator: per-tensor; kept beside the graph, its counts in the stage info
        shutil.copyfile(choices, ctx.outdir / CHOICES_FILE)
    searched: dict[str, Any] = {}
    corrected: dict[str, Any] = {}
    config = target.int8_session_config()
    if options.sensitivity or options.accuracy_budget:
        if method.bias_correction:  # first, on the full graph; every probe and candidate gets its shifts
            deltas: dict[str, Any] = {}
            full = recipe.write(recipe.model.parent / "corrected.onnx")
            corrected = _correct_biases(recipe, full, method, config, ctx, deltas)
            corrected["applied"] = "before the search, to every probe and candidate; float nodes drop theirs"
            recipe = dataclasses.replace(recipe, bias_shifts=deltas)
        sensitivity = options.sensitivity or SensitivityOptions()
        searched = budget_search(recipe, out, sensitivity, options.accuracy_budget, method.samples, ctx, config)
    else:
        recipe.write(out)
        if method.bias_correction:
            corrected = _correct_biases(recipe, out, method, config, ctx)
    shutil.rmtree(recipe.model.parent)
    info = {
        "method": "static",
        "calibration_seconds": seconds,
        "calibrator": method.calibrator,
        **_choice_counts(ctx.outdir / CHOICES_FILE),
        "activations": "int8 symmetric" if target.symmetric_activations else "uint8 asymmetric",
        "weights": "int8 symmetric per-channel" if method.per_channel else "int8 symmetric per-tensor",
        "lm_head": options.lm_head,
    }
    info["reduce_range"] = method.reduce_range
    if corrected:
        info["bias_correction"] = corrected
    info.update(searched)
    if method.reduce_range:
        info["weights"] += " (7-bit range)"
    if transformer:
        info.update(quantized_op_types=transformer, float_op_types=_float_op_types(out, transformer))
    if target.int8_session_config():
        info[ORT_SESSION_CONFIG] = target.int8_session_config()
    elif int8_dot_saturates() and not method.reduce_range:
        info["int8_dot_saturates"] = True
        ctx.reporter.log(
            "  note: this CPU has no VNNI; ONNX Runtime's u8·s8 kernels may saturate here (if accuracy drops, "
            "try reduce_range: true, or measure on the deployment CPU)"
        )
    if target.tensorrt_rules:
        from compress.checks.tensorrt import assert_tensorrt_ready

        assert_tensorrt_ready(str(out), source=f"quantize → {artifact.name}")
        info["tensorrt_rules"] = "passed"
        ctx.reporter.log("  TensorRT Q/DQ rules: passed")
    return StageOutput(file="model.onnx", format="onnx", precision="int8", info=info, target=target.name)


def _correct_biases(
    recipe: QdqRecipe,
    out: Path,
    method: algorithms.StaticOptions,
    config: dict[str, str],
    ctx: StageContext,
    deltas: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`bias_correction: true`: the written graph's biases shifted on the samples the ranges came from."""
    from compress.quant.bias_correction import correct_biases

    if recipe.large:
        raise StageError(
            "quantize int8: bias_correction handles graphs under 2 GB only (this one is stored with external data); "
            "remove bias_correction"
        )
    batches = list(ctx.adapter.calibration_inputs(method.samples, batch_size=32))
    start = time.perf_counter()
    with ctx.reporter.task(f"bias correction ({method.samples} samples)", total=None):
        info = correct_biases(recipe.model, out, batches, threads=ctx.threads, session_config=config, deltas=deltas)
    if not info["corrected_layers"]:
        raise StageError(f"quantize int8: bias_correction found no quantized Conv/Gemm with a bias in {out.name}")
    info["seconds"] = round(time.perf_counter() - start, 1)
    return info


def _choice_counts(path: Path) -> dict[str, Any]:
    """`calibrator: per-tensor`: how many tensors took each calibrator's range (the file names each one)."""
    if not path.is_file():
        return {}
    chosen = [entry["chosen"] for entry in json.loads(path.read_text()).values()]
    return {"range_choice": {c: chosen.count(c) for c in CANDIDATES}, "range_choice_file": CHOICES_FILE}


def _calibrate_static(
    src: Path,
    method: algorithms.StaticOptions,
    target: targets.TargetOptions,
    exclude: list[str],
    transformer: list[str] | None,
    ctx: StageContext,
) -> QdqRecipe:
    """Pre-process `src` into `outdir/_pre/`, calibrate on the adapter's inputs (ranges saved beside it) and
    return the recipe that writes Q/DQ graphs from them (`compress.quant.calibration` says why two steps)."""
    # ONNX Runtime writes scratch files beside its input: the pre-processed graph lives in a folder of ours.
    pre = ctx.outdir / "_pre" / "model.onnx"
    pre.parent.mkdir()
    large = wants_external_data(src)
    with quiet_third_party():
        # Symbolic shape inference keeps the graph in one proto, which cannot be saved beyond 2 GB.
        pre_process(
            str(src),
            str(pre),
            skip_symbolic_shape=large,
            save_as_external_data=large,
            all_tensors_to_one_file=True,
            external_data_location=data_file(pre).name,
        )
    symmetric = target.symmetric_activations
    # TensorRT takes biases in float (it fuses them itself); an INT32 bias DequantizeLinear breaks its rules.
    extra = {"WeightSymmetric": True, "ActivationSymmetric": symmetric, "QuantizeBias": not symmetric}
    if transformer:  # their outputs too: else the Add / Mul / Softmax after them would read 8-bit values
        extra["OpTypesToExcludeOutputQuantization"] = transformer
    reads = passes(method.calibrator)
    label = f"calibrate ({method.calibrator}, {method.samples} samples" + (f", {reads} passes)" if reads > 1 else ")")
    with ctx.reporter.task(label, total=reads * method.samples) as task:
        cache = compute_ranges(
            pre,
            lambda: ctx.adapter.calibration_inputs(method.samples, batch_size=8),
            progress=task.advance,
            calibrator=method.calibrator,
            symmetric_activations=symmetric,
            percentile=method.percentile,
            op_types=method.op_types,
            cache=pre.parent / "ranges.json",
            large=large,
        )
    return QdqRecipe(
        model=pre,
        cache=cache,
        calibrator=method.calibrator,
        per_channel=method.per_channel,
        symmetric_activations=symmetric,
        reduce_range=bool(method.reduce_range),
        op_types=tuple(method.op_types) if method.op_types else None,
        large=large,
        extra=extra,
        exclude=tuple(exclude),
    )


#: what ONNX Runtime's symbolic shape inference leaves in the working directory when it gives up
SHAPE_DEBRIS = "sym_shape_infer_temp.onnx"


def pre_process(src: str, dst: str, **kwargs) -> None:
    """`quant_pre_process`, retried with ONNX's own shape inference when ORT's symbolic one gives up (it does
    on BERT graphs with a dynamic sequence); the debris that failure leaves in the cwd is removed."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    debris = Path.cwd() / SHAPE_DEBRIS
    existed = debris.exists()
    try:
        quant_pre_process(src, dst, **kwargs)
    except Exception as exc:  # a bare Exception("Incomplete symbolic shape inference")
        if kwargs.get("skip_symbolic_shape") or "symbolic shape" not in str(exc):
            raise
        if debris.is_file() and not existed:
            graph = onnx.load(str(debris), load_external_data=False).graph
            for location in {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}:
                (debris.parent / location).unlink(missing_ok=True)
            debris.unlink()
        quant_pre_process(src, dst, **{**kwargs, "skip_symbolic_shape": True})


TRANSFORMER_OPS = frozenset({"LayerNormalization", "Softmax"})  # the graph is a transformer's
TRANSFORMER_QUANTIZED = ["Conv", "Gemm", "MatMul"]  # the ops a transformer gets in INT8
_LAYOUT = ("Shape", "Reshape", "Transpose", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Flatten", "Expand")
_NOT_COMPUTE = frozenset(("QuantizeLinear", "DequantizeLinear", "Constant", "Cast", *_LAYOUT))


def _transformer_op_types(path) -> list[str] | None:  # noqa: ANN001 - a Path
    """MatMul/Gemm/Conv for a transformer's graph; None (every op ORT quantizes) for any other."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return TRANSFORMER_QUANTIZED if any(n.op_type in TRANSFORMER_OPS for n in graph.node) else None


def _float_op_types(path, quantized: list[str]) -> dict[str, int]:  # noqa: ANN001 - a Path
    """{op type: nodes} of the quantized graph's compute nodes left in float (Q/DQ and shape ops aside)."""
    import onnx

    skip = {*_NOT_COMPUTE, *quantized}
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type not in skip:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
