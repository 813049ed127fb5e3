"""The numbers behind the report's pictures, on hand-made cases whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from compress.report import llm, vision


def test_confusion_matrix_counts_every_sample_in_its_true_row_and_predicted_column() -> None:
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    cm = vision.confusion_matrix(labels, preds, 4)
    assert cm.sum() == 200
    assert (cm.sum(axis=1) == np.bincount(labels, minlength=4)).all()
    assert (cm.sum(axis=0) == np.bincount(preds, minlength=4)).all()
    assert cm[2, 1] == int(((labels == 2) & (preds == 1)).sum())
    assert np.trace(cm) == int((labels == preds).sum())


def test_per_class_accuracy_and_an_empty_class() -> None:
    cm = vision.confusion_matrix(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1]), 3)
    acc = vision.per_class_accuracy(cm)
    assert acc[0] == pytest.approx(200 / 3) and acc[1] == 100.0 and np.isnan(acc[2])


def test_flipped_are_baseline_right_and_compressed_wrong_only() -> None:
    labels = np.array([0, 1, 2, 3, 4])
    base = np.array([0, 1, 0, 3, 4])  # wrong on sample 2
    now = np.array([1, 1, 2, 0, 4])  # wrong on 0 and 3, fixed 2
    assert vision.flipped(labels, base, now).tolist() == [0, 3]
    assert vision.flipped(labels, now, base).tolist() == [2]


def test_ece_of_a_hand_made_case() -> None:
    # bin (0.6, 0.667]: conf 0.65 x2, one right -> |0.5 - 0.65| * 2/4; bin (0.933, 1]: conf 1.0 x2, both right -> 0
    conf = np.array([0.65, 0.65, 1.0, 1.0])
    correct = np.array([1, 0, 1, 1])
    assert vision.expected_calibration_error(conf, correct, bins=15) == pytest.approx(100 * 0.5 * 0.15)
    assert vision.expected_calibration_error(np.full(10, 0.7), np.r_[np.ones(7), np.zeros(3)]) == pytest.approx(0)


def test_ece_refuses_no_samples() -> None:
    with pytest.raises(ValueError, match="no samples"):
        vision.expected_calibration_error(np.array([]), np.array([]))


def test_first_divergence() -> None:
    assert llm.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert llm.first_divergence([1, 5, 3], [1, 2, 3]) == 1
    assert llm.first_divergence([1, 2], [1, 2, 3]) == 2  # stopped early: diverges where it ends


def test_failure_card_counts_each_failure_kind() -> None:
    loop = [7, 8, 9, 10] * 3
    continuations = [loop, [], [1, 2], list(range(12))]
    texts = ["abcd" * 3, "", "ok\ufffd", "fine text"]
    card = llm.failure_card(continuations, texts, expected=12)
    assert card == {"prompts": 4, "repetition loop": 1, "empty": 1, "truncated": 1, "non-text bytes": 1}


def _sweep_manifest(by_prompt: dict[str, float]):
    from compress.records import ArtifactRecord, BenchRecord, RunManifest

    bench = BenchRecord((), "onnxruntime", 1, 100.0, llm={"decode_tokens_per_s_by_prompt": by_prompt})
    rec = ArtifactRecord({"name": "int4"}, cached=False, size_bytes=1, bench=bench)
    return RunManifest("0", "now", {"name": "lm"}, "source", ("ppl",), (), (rec,), (), "PASS")


def test_decode_sweep_reads_json_keys_in_length_order_and_is_empty_when_not_asked() -> None:
    from compress.report.markdown import decode_sweep, decode_sweep_rows

    swept = _sweep_manifest({"512": 50.0, "16": 200.0, "128": 100.0})  # manifest JSON: string keys, any order
    assert decode_sweep(swept) == {"int4": {16: 200.0, 128: 100.0, 512: 50.0}}
    assert decode_sweep_rows(swept)[1] == [["int4", "200.0", "100.0", "50.0"]]
    assert decode_sweep(_sweep_manifest({"128": 100.0})) == {}  # the default one point: no plot, no table
