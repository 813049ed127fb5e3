"""Static Q/DQ calibration (`compress.quant.calibration`): why entropy used to equal minmax, and that the
ranges we compute now differ; chunked collection gives the ranges of one call over all the data; a graph
written from the saved ranges equals ONNX Runtime's one-call result."""

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
        lambda: iter(_batches()),
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


@pytest.mark.parametrize("calibrator", ["minmax", "entropy", "percentile"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_ranges_equal_one_call_over_all_the_data(pre: Path, tmp_path: Path, calibrator: str, chunk: int):
    """Bounded memory changes nothing: the saved ranges (and, for histograms, every bin count and edge) equal
    ORT's single `collect_data` over every batch, with chunks that split the data unevenly and one batch of
    wide activations after the first chunk (where ORT's own merge re-bins; checked to differ without the seed)."""
    from onnxruntime.quantization.calibrate import create_calibrator, load_tensors_data

    from compress.quant.calibration import CALIBRATOR_OPTIONS, calibration_method, passes

    rng = np.random.default_rng(1)
    batches = [
        {"input": rng.standard_normal((8, 3, 28, 28), dtype=np.float32) * (5 if i == 5 else 1)} for i in range(7)
    ]
    seen: list[int] = []
    ours = compute_ranges(
        pre,
        lambda: iter(batches),
        calibrator=calibrator,
        percentile=99.9,
        op_types=None,
        cache=tmp_path / "chunked.json",
        large=False,
        chunk=chunk,
        progress=seen.append,
    )
    assert seen == [8] * 7 * passes(calibrator)  # every batch, once per pass

    options = dict(CALIBRATOR_OPTIONS[calibrator], **({"percentile": 99.9} if calibrator == "percentile" else {}))
    calib = create_calibrator(
        pre,
        None,
        augmented_model_path=str(tmp_path / "aug.onnx"),
        calibrate_method=calibration_method(calibrator),
        extra_options=options,
    )
    calib.collect_data(_Reader(batches))
    theirs = calib.compute_data().data
    mine = load_tensors_data(ours).data
    assert set(mine) == set(theirs) and len(mine) >= 5
    for name, t in theirs.items():
        for key in ("range_value", "hist", "hist_edges", "bins"):
            if getattr(t, key, None) is not None:
                got, want = np.asarray(getattr(mine[name], key)), np.asarray(getattr(t, key))
                np.testing.assert_array_equal(got, want, err_msg=f"{name}.{key}")


def test_a_smaller_last_batch_is_calibrated_in_its_own_chunk(pre: Path, tmp_path: Path) -> None:
    """ORT stacks one call's outputs per tensor, so batches of two shapes cannot share a call: the chunks split
    there, and every sample counts (here the last 3 hold the widest values, so the range must reach them)."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    rng = np.random.default_rng(2)
    batches = [{"input": rng.standard_normal((8, 3, 28, 28), dtype=np.float32)} for _ in range(2)]
    wide = [{"input": rng.standard_normal((3, 3, 28, 28), dtype=np.float32) * 10}]
    ranges = {}
    for name, data in (("narrow", batches), ("all", batches + wide)):
        cache = compute_ranges(
            pre,
            lambda d=data: iter(d),
            calibrator="percentile",
            percentile=99.9,
            op_types=None,
            cache=tmp_path / f"{name}.json",
            large=False,
        )
        ranges[name] = load_tensors_data(cache).data["input"].range_value
    assert float(np.ravel(ranges["all"][1])[0]) > 2 * float(np.ravel(ranges["narrow"][1])[0])
