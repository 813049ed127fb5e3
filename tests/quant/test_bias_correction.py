"""Bias correction of a Q/DQ graph (`compress.quant.bias_correction`) on a tiny CNN: the corrected graph's
output is closer to the float graph's on data it was not corrected on, and only the biases changed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compress.quant.bias_correction import correct_biases


def _batches(seed: int, n: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    # a mean away from zero: the shift a bias can absorb is then visible in the logits
    return [{"input": rng.standard_normal((16, 3, 28, 28), dtype=np.float32) + 0.5} for _ in range(n)]


def _logits(path: Path, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, b)[0] for b in batches])


@pytest.fixture(scope="module")
def pre(tiny_cnn_pre: Path) -> Path:
    return tiny_cnn_pre


@pytest.mark.parametrize("quantize_bias", [True, False], ids=["int32-bias", "float-bias"])
def test_bias_correction_brings_the_output_closer_to_float(
    pre: Path, tmp_path: Path, quantize_bias: bool, minmax_recipe
) -> None:
    calibration, held_apart = _batches(0), _batches(1)
    recipe = minmax_recipe(
        pre,
        calibration,
        tmp_path / "r.json",
        per_channel=False,  # per-tensor 7-bit weights: a coarse grid, a clear mean shift per output channel
        reduce_range=True,
        extra={"WeightSymmetric": True, "ActivationSymmetric": False, "QuantizeBias": quantize_bias},
    )
    plain = recipe.write(tmp_path / "plain.onnx")
    corrected = recipe.write(tmp_path / "corrected.onnx")
    info = correct_biases(pre, corrected, calibration, threads=1)
    assert info["corrected_layers"] == 5  # four convs (BN folded into their bias) and the Linear head
    assert info["layers_without_bias"] == 0

    reference = _logits(pre, held_apart)
    before, after = _logits(plain, held_apart) - reference, _logits(corrected, held_apart) - reference
    # the mean error per class (what a bias can remove) shrinks, and with it the RMS error
    assert np.abs(after.mean(0)).mean() < 0.5 * np.abs(before.mean(0)).mean()
    assert np.linalg.norm(after) < np.linalg.norm(before)

    # only the biases changed: the initializers the layers' third input is (or is dequantized from)
    graph = onnx.load(str(corrected)).graph
    producer = {out: n for n in graph.node for out in n.output}
    biases = {n.input[2] for n in graph.node if n.op_type in ("Conv", "Gemm")}
    biases = {producer[x].input[0] if x in producer else x for x in biases}
    a = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(plain)).graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    changed = {k for k in a if not np.array_equal(a[k], b[k])}
    assert changed and changed <= biases, (changed, biases)
    kinds = {b[k].dtype for k in changed}
    assert kinds == ({np.dtype(np.int32)} if quantize_bias else {np.dtype(np.float32)})


class _Adapter:
    """What the static path of the stage asks of a family when no search runs: calibration inputs."""

    default_int8_method = "static"

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.images = np.concatenate([b["input"] for b in batches])

    def calibration_inputs(self, samples: int | None = None, batch_size: int = 1):
        n = len(self.images) if samples is None else min(samples, len(self.images))
        for start in range(0, n, batch_size):
            yield {"input": self.images[start : min(start + batch_size, n)]}


def test_the_stage_corrects_when_asked_and_records_it(pre: Path, tmp_path: Path) -> None:
    from compress.progress import Reporter
    from compress.stages.base import StageContext
    from compress.stages.quantize.int8 import Int8Options, quantize_int8

    artifact = SimpleNamespace(name="onnx-fp32", precision="fp32", main=pre)
    files = {}
    for on in (False, True):
        method = {"name": "static", "calibrator": "minmax", "samples": 64, "bias_correction": on}
        out = tmp_path / str(on)
        out.mkdir()
        ctx = StageContext(_Adapter(_batches(0)), out, {}, None, Reporter(quiet=True), 1, 0, "test")
        info = quantize_int8(artifact, Int8Options(precision="int8", method=method), ctx).info
        assert not (out / "_pre").exists()
        assert ("bias_correction" in info) is on
        files[on] = out / "model.onnx"
    assert info["bias_correction"]["corrected_layers"] == 5 and info["bias_correction"]["seconds"] >= 0
    reference = _logits(pre, _batches(1))
    errors = {on: np.linalg.norm(_logits(f, _batches(1)) - reference) for on, f in files.items()}
    assert errors[True] < errors[False], errors
