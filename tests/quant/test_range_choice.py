"""`calibrator: per-tensor` (`compress.quant.range_choice`): the error estimate on known histograms, and on a
tiny CNN every tensor takes the candidate range with the least estimated error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from compress.quant.calibration import CHOICES_FILE, compute_ranges, passes
from compress.quant.range_choice import CANDIDATES, quantization_mse


def test_error_of_a_uniform_histogram_is_rounding_inside_and_distance_outside() -> None:
    edges = np.linspace(0.0, 1.0, 1001)
    hist = np.ones(1000)
    step = 1.0 / 255
    assert quantization_mse(hist, edges, 0.0, 1.0, symmetric=False) == pytest.approx(step**2 / 12, rel=1e-9)
    # clipped at 0.5: half the values lose on average (0.25)^2 + var of a uniform over [0, 0.5] = 1/48 ...
    clipped = quantization_mse(hist, edges, 0.0, 0.5, symmetric=False)
    expected = 0.5 * (0.25**2 + 0.5**2 / 12) + (0.5 / 255) ** 2 / 12
    assert clipped == pytest.approx(expected, rel=1e-3)
    # symmetric int8: the grid spans ±1 in 254 steps, twice as coarse on non-negative data
    assert quantization_mse(hist, edges, 0.0, 1.0, symmetric=True) == pytest.approx((2 / 254) ** 2 / 12, rel=1e-9)


def test_each_tensor_takes_the_candidate_with_the_least_error(tiny_cnn_pre: Path, tmp_path: Path) -> None:
    from onnxruntime.quantization.calibrate import load_tensors_data

    rng = np.random.default_rng(3)
    # heavy-tailed inputs (a few values 30x the rest): clipping pays on some tensors and not on others
    batches = []
    for _ in range(6):
        x = rng.standard_normal((8, 3, 28, 28)).astype(np.float32)
        x[rng.random(x.shape) < 1e-3] *= 30
        batches.append({"input": x})
    seen: list[int] = []
    cache = compute_ranges(
        tiny_cnn_pre,
        lambda: iter(batches),
        calibrator="per-tensor",
        percentile=99.9,
        op_types=None,
        cache=tmp_path / "ranges.json",
        large=False,
        progress=seen.append,
    )
    assert sum(seen) == passes("per-tensor") * 48 == 5 * 48
    chosen = load_tensors_data(cache).data
    record = json.loads((tmp_path / CHOICES_FILE).read_text())
    candidates = {c: load_tensors_data(tmp_path / f"ranges-{c}.json").data for c in CANDIDATES}
    entropy = candidates["entropy"]
    assert set(chosen) == set(record) == set(entropy) and len(chosen) >= 5
    for name, entry in record.items():
        best = min(CANDIDATES, key=lambda c: entry["mse"][c])
        assert entry["chosen"] == best
        np.testing.assert_array_equal(chosen[name].range_value, candidates[best][name].range_value)
        for c in CANDIDATES:  # the recorded error is the estimate from the entropy pass's histogram
            low, high = (float(np.ravel(v)[0]) for v in candidates[c][name].range_value)
            mse = quantization_mse(entropy[name].hist, entropy[name].bins, low, high, symmetric=False)
            assert entry["mse"][c] == pytest.approx(mse, rel=1e-5)
    # the tails make the choice differ between tensors: not one calibrator everywhere
    assert len({e["chosen"] for e in record.values()}) >= 2, record
