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

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from compress.progress import quiet_third_party
from compress.quant.range_choice import CANDIDATES, choose_ranges

#: calibrator settings `create_calibrator` reads (`extra_options`), per calibrator. Entropy: 512 histogram
#: bins, thresholds searched from 128 bins up (TensorRT's KL method; 2048 bins took 14 s on a 4-conv toy);
#: percentile: ORT's defaults.
CALIBRATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "minmax": {},
    "entropy": {"num_bins": 512, "num_quantized_bins": 128},
    "percentile": {"num_bins": 2048},
}
# per-tensor writes fixed ranges chosen among the three: quantize_static reads them as min/max ranges
_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile", "per-tensor": "MinMax"}
#: where `calibrator: per-tensor` records which calibrator each tensor took (beside the ranges file)
CHOICES_FILE = "range_choices.json"


def calibration_method(calibrator: str):  # -> onnxruntime.quantization.CalibrationMethod
    with quiet_third_party():
        from onnxruntime.quantization import CalibrationMethod
    return getattr(CalibrationMethod, _METHODS[calibrator])


#: batches (of 8 samples) whose activations are held at once while ranges are collected
CHUNK_BATCHES = 8

Batches = Callable[[], Iterator[dict[str, np.ndarray]]]


def passes(calibrator: str) -> int:
    """How many times `compute_ranges` reads the calibration data: histograms need the global range first."""
    if calibrator == "per-tensor":
        return sum(passes(c) for c in CANDIDATES)
    return 1 if calibrator == "minmax" else 2


def compute_ranges(
    model: Path,
    batches: Batches,
    *,
    calibrator: str,
    percentile: float,
    op_types: Sequence[str] | None,
    cache: Path,
    large: bool,
    chunk: int = CHUNK_BATCHES,
    progress: Callable[[int], None] | None = None,
    symmetric_activations: bool = False,
) -> Path:
    """Run `model` on the batches `batches()` yields, compute each tensor's range with `calibrator`, save them
    at `cache`. `progress(n)` is called with each batch's sample count, on every pass. `per-tensor` computes
    the three and keeps, per tensor, the range with the least quantization error (`compress.quant.range_choice`;
    `symmetric_activations` says which 8-bit grid), recording the choice in CHOICES_FILE beside `cache`.

    Memory is bounded by `chunk` batches of activations, not by the whole calibration set: one
    `collect_data` call holds every intermediate output of every batch it reads (6.2 GB for 512 MobileNetV2
    images at 96 px). Min/max ranges merge exactly across calls (ONNX Runtime's `merge_range`). A histogram
    does not: ORT sizes it on the first call's range and re-bins on later ones. So for entropy / percentile a
    first pass finds each tensor's global min/max, the histograms are seeded empty at that range, and the
    second pass adds each chunk's counts on the same bins: the same histograms, hence the same ranges, as one
    call over all the data (tests/quant/test_calibration.py checks they are equal).
    """
    if calibrator == "per-tensor":
        return _per_tensor(model, batches, percentile, op_types, cache, large, chunk, progress, symmetric_activations)
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
        if passes(calibrator) == 2:
            _seed_histograms(calib, _global_extrema(calib, _counted(batches(), progress)))
        for part in _chunks(_counted(batches(), progress), chunk):
            calib.collect_data(_Replay(part))
        save_tensors_data(calib.compute_data(), cache)
    del calib
    (cache.parent / "augmented.onnx").unlink(missing_ok=True)
    for scratch in cache.parent.glob("augmented.onnx*"):
        scratch.unlink()
    return cache


def _per_tensor(
    model: Path,
    batches: Batches,
    percentile: float,
    op_types: Sequence[str] | None,
    cache: Path,
    large: bool,
    chunk: int,
    progress: Callable[[int], None] | None,
    symmetric: bool,
) -> Path:
    with quiet_third_party():
        from onnxruntime.quantization.calibrate import TensorsData, load_tensors_data, save_tensors_data

    found = {}
    for calibrator in CANDIDATES:
        path = compute_ranges(
            model,
            batches,
            calibrator=calibrator,
            percentile=percentile,
            op_types=op_types,
            cache=cache.with_name(f"ranges-{calibrator}.json"),
            large=large,
            chunk=chunk,
            progress=progress,
        )
        found[calibrator] = load_tensors_data(path)
    chosen, record = choose_ranges(found, symmetric=symmetric)
    with quiet_third_party():
        save_tensors_data(TensorsData(calibration_method("per-tensor"), chosen), cache)
    (cache.parent / CHOICES_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
    return cache


def _counted(
    batches: Iterator[dict[str, np.ndarray]], progress: Callable[[int], None] | None
) -> Iterator[dict[str, np.ndarray]]:
    for batch in batches:
        if progress is not None:
            progress(len(next(iter(batch.values()))))
        yield batch


def _chunks(batches: Iterator[dict[str, np.ndarray]], size: int) -> Iterator[list[dict[str, np.ndarray]]]:
    """Runs of at most `size` batches whose inputs have one shape (ORT stacks a call's outputs per tensor)."""
    part: list[dict[str, np.ndarray]] = []
    for batch in batches:
        if part and (len(part) == size or _shapes(part[-1]) != _shapes(batch)):
            yield part
            part = []
        part.append(batch)
    if part:
        yield part


def _shapes(batch: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in batch.items()}


class _Replay:
    """A CalibrationDataReader over a list of batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _global_extrema(calib: Any, batches: Iterator[dict[str, np.ndarray]]) -> dict[str, tuple[Any, Any, Any]]:
    """Each calibrated tensor's (nanmin, nanmax, smallest |value|) over every batch, in its own dtype, as ORT's
    collector takes them over all the data at once."""
    session = calib.infer_session
    names = [o.name for o in session.get_outputs()]
    wanted = set(calib.tensors_to_calibrate)
    found: dict[str, tuple[Any, Any, Any]] = {}
    for batch in batches:
        for name, value in zip(names, session.run(None, batch), strict=True):
            if name not in wanted or value.size == 0:
                continue
            now = (np.nanmin(value), np.nanmax(value), np.abs(value).min())
            old = found.get(name, now)
            found[name] = (min(old[0], now[0]), max(old[1], now[1]), min(old[2], now[2]))
    return found


def _seed_histograms(calib: Any, extrema: dict[str, tuple[Any, Any, Any]]) -> None:
    """Give `calib` a collector whose histograms are empty on the bins one call over all the data would have
    made, so every chunk's counts add onto them without re-binning. ORT's `collect_value` (entropy, asymmetric
    percentile) bins [-t, t] with t the largest |value|; `collect_absolute_value` (symmetric percentile, ORT's
    default for it) bins |value| over [smallest, largest]; later calls inside those edges only add counts."""
    with quiet_third_party():
        from onnxruntime.quantization.calibrate import HistogramCollector

    collector = HistogramCollector(
        method=calib.method,
        symmetric=calib.symmetric,
        num_bins=calib.num_bins,
        num_quantized_bins=calib.num_quantized_bins,
        percentile=calib.percentile,
        scenario=calib.scenario,
    )
    absolute = calib.method == "percentile" and calib.symmetric  # HistogramCollector.collect's own choice
    for name, (lo, hi, abs_lo) in extrema.items():
        threshold = np.array(max(abs(lo), abs(hi)), dtype=lo.dtype)
        if absolute:
            _, edges = np.histogram(np.array([abs_lo, threshold], dtype=lo.dtype), bins=calib.num_bins)
            hist = np.zeros(calib.num_bins, dtype=np.intp)
            collector.histogram_dict[name] = (hist, edges.astype(lo.dtype), lo, hi)
        else:
            hist, edges = np.histogram(np.empty(0, dtype=lo.dtype), calib.num_bins, range=(-threshold, threshold))
            collector.histogram_dict[name] = (hist, edges, lo, hi, threshold)
    calib.collector = collector


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
