"""Static Q/DQ calibration (`compress.quant.calibration`): why entropy used to equal minmax, and that the
ranges we compute now differ; a graph written from the saved ranges equals ONNX Runtime's one-call result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from compress.quant.calibration import compute_ranges


class _Reader:
    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _batches() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"input": rng.standard_normal((8, 3, 28, 28), dtype=np.float32)} for _ in range(4)]


@pytest.fixture(scope="module")
def pre(tiny_cnn_pre: Path) -> Path:
    return tiny_cnn_pre


def _ranges(pre: Path, calibrator: str, tmp: Path) -> dict[str, tuple[float, float]]:
    from onnxruntime.quantization.calibrate import load_tensors_data

    cache = compute_ranges(
        pre,
        _Reader(_batches()),
        calibrator=calibrator,
        percentile=99.99,
        op_types=None,
        cache=tmp / f"{calibrator}.json",
        large=False,
    )
    data = load_tensors_data(cache)
    return {
        name: (float(np.ravel(t.range_value[0])[0]), float(np.ravel(t.range_value[1])[0]))
        for name, t in data.data.items()
    }


def test_entropy_with_ort_default_bins_is_minmax_and_ours_is_not(pre: Path, tmp_path: Path) -> None:
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    minmax = _ranges(pre, "minmax", tmp_path)
    # What `quantize_static` built: it forwards no num_bins / num_quantized_bins, so both default to 128 and
    # the KL search has one candidate, the whole histogram: the min/max ranges, to float rounding.
    calib = create_calibrator(
        pre, None, augmented_model_path=str(tmp_path / "aug.onnx"), calibrate_method=CalibrationMethod.Entropy
    )
    calib.collect_data(_Reader(_batches()))
    default = {
        k: (float(np.ravel(v.range_value[0])[0]), float(np.ravel(v.range_value[1])[0]))
        for k, v in calib.compute_data().data.items()
    }
    shared = sorted(set(default) & set(minmax))
    assert len(shared) >= 5
    assert np.allclose([default[k] for k in shared], [minmax[k] for k in shared], rtol=1e-5, atol=1e-6)
    # ours: 512 bins searched down to 128: the ranges of the wide activations are clipped
    entropy = _ranges(pre, "entropy", tmp_path)
    widths = [
        (entropy[k][1] - entropy[k][0]) / (minmax[k][1] - minmax[k][0]) for k in shared if minmax[k][1] > minmax[k][0]
    ]
    assert min(widths) < 0.9 and max(widths) <= 1.0 + 1e-6, widths


def test_a_graph_from_saved_ranges_equals_quantize_static_in_one_call(pre: Path, tmp_path: Path, minmax_recipe) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    extra = {"WeightSymmetric": True, "ActivationSymmetric": False, "QuantizeBias": True}
    recipe = minmax_recipe(pre, _batches(), tmp_path / "r.json", extra=extra)
    ours = onnx.load(str(recipe.write(tmp_path / "ours.onnx")))
    quantize_static(
        str(pre),
        str(tmp_path / "ort.onnx"),
        _Reader(_batches()),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options=extra,
    )
    theirs = onnx.load(str(tmp_path / "ort.onnx"))
    assert [n.op_type for n in ours.graph.node] == [n.op_type for n in theirs.graph.node]
    init = {t.name: onnx.numpy_helper.to_array(t) for t in theirs.graph.initializer}
    for t in ours.graph.initializer:
        np.testing.assert_allclose(onnx.numpy_helper.to_array(t), init[t.name], rtol=1e-6)  # same ranges, same file
