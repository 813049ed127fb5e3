"""Static Q/DQ in two steps: calibrate once (tensor ranges to a JSON file), then write Q/DQ graphs from it.

Why not one `quantize_static` call: (1) `quantize_static` forwards only `symmetric`, `moving_average`,
`averaging_constant`, `max_intermediate_outputs` and `percentile` to the calibrator, never `num_bins` /
`num_quantized_bins`; the entropy calibrator's defaults are then 128 and 128, so its KL search has one
candidate, the whole histogram, and `calibrator: entropy` wrote the same ranges as `minmax` (checked in
tests/quant/test_calibration.py). We build the calibrator with `create_calibrator` and pass them.
(2) Sensitivity analysis and the accuracy-budget fallback write one graph per set of float nodes; ONNX
Runtime's `calibration_cache_path` lets each reuse the ranges (JSON, not a pickle) instead of calibrating again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from compress.progress import quiet_third_party

#: calibrator settings `create_calibrator` reads (`extra_options`), per calibrator. Entropy: 512 histogram
#: bins, thresholds searched from 128 bins up (TensorRT's KL method; 2048 bins took 14 s on a 4-conv toy);
#: percentile: ORT's defaults.
CALIBRATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "minmax": {},
    "entropy": {"num_bins": 512, "num_quantized_bins": 128},
    "percentile": {"num_bins": 2048},
}
_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def calibration_method(calibrator: str):  # -> onnxruntime.quantization.CalibrationMethod
    with quiet_third_party():
        from onnxruntime.quantization import CalibrationMethod
    return getattr(CalibrationMethod, _METHODS[calibrator])


def compute_ranges(
    model: Path,
    reader: Any,
    *,
    calibrator: str,
    percentile: float,
    op_types: Sequence[str] | None,
    cache: Path,
    large: bool,
) -> Path:
    """Run `model` on the reader's batches, compute each tensor's range with `calibrator`, save them at `cache`."""
    with quiet_third_party():
        from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    options = dict(CALIBRATOR_OPTIONS[calibrator])
    if calibrator == "percentile":
        options["percentile"] = percentile
    ops = list(op_types) if op_types else sorted({*QLinearOpsRegistry, *QDQRegistry})  # quantize_static's default
    with quiet_third_party():
        calib = create_calibrator(
            model,
            ops,
            augmented_model_path=str(cache.parent / "augmented.onnx"),
            calibrate_method=calibration_method(calibrator),
            use_external_data_format=large,
            extra_options=options,
        )
        calib.collect_data(reader)
        save_tensors_data(calib.compute_data(), cache)
    del calib
    (cache.parent / "augmented.onnx").unlink(missing_ok=True)
    for scratch in cache.parent.glob("augmented.onnx*"):
        scratch.unlink()
    return cache


@dataclass(frozen=True)
class QdqRecipe:
    """Everything `quantize_static` needs besides the output path and the nodes kept in float: one recipe,
    many graphs (the full INT8 one, one per sensitivity probe, one per fallback candidate)."""

    model: Path  # the pre-processed float graph
    cache: Path  # tensor ranges from `compute_ranges`
    calibrator: str
    per_channel: bool
    symmetric_activations: bool
    reduce_range: bool
    op_types: tuple[str, ...] | None
    large: bool
    extra: dict[str, Any] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()  # nodes float in every graph of this recipe (exclude_nodes, lm_head: float)
    bias_shifts: dict[str, Any] | None = None  # node -> bias correction of the full graph, applied to every graph

    def write(self, out: Path, float_nodes: Sequence[str] = ()) -> Path:
        """The Q/DQ graph at `out` with `exclude` and `float_nodes` left in float (and `bias_shifts` applied)."""
        with quiet_third_party():
            from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

            quantize_static(
                str(self.model),
                str(out),
                None,
                quant_format=QuantFormat.QDQ,
                per_channel=self.per_channel,
                activation_type=QuantType.QInt8 if self.symmetric_activations else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=calibration_method(self.calibrator),
                nodes_to_exclude=[*self.exclude, *float_nodes] or None,
                op_types_to_quantize=list(self.op_types) if self.op_types else None,
                use_external_data_format=self.large,
                reduce_range=self.reduce_range,
                extra_options=dict(self.extra),
                calibration_cache_path=str(self.cache),
            )
        if self.bias_shifts:
            from compress.quant.bias_correction import shift_biases

            shift_biases(out, self.bias_shifts)
        return out

    def with_exclude(self, more: Sequence[str]) -> QdqRecipe:
        return replace(self, exclude=(*self.exclude, *more))


def quantizable_nodes(recipe: QdqRecipe, types: Sequence[str] = ("Conv", "MatMul", "Gemm")) -> list[str]:
    """Names of the graph's nodes of `types` (and of the recipe's op types) that the recipe quantizes."""
    import onnx

    graph = onnx.load(str(recipe.model), load_external_data=False).graph
    allowed = set(types) & set(recipe.op_types) if recipe.op_types else set(types)
    return [n.name for n in graph.node if n.op_type in allowed and n.name and n.name not in recipe.exclude]
