"""Static INT8 sensitivity and the accuracy-budget fallback on a net with two fragile convs (tests/toys.py
FragileCNN, random weights: only the logic is checked, never the quality of such a model).

The stage runs on an ONNX file with a small stand-in adapter: random calibration images, and as labels of
the held-apart slice the float graph's own top-1 (so the float graph scores 100 there and any drop is what
quantization cost). The gate is checked on records, and the cache key on the validated options.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from toys import export_image_model, fragile_cnn

from compress.families.base import Evaluation
from compress.families.vision import task
from compress.progress import Reporter
from compress.stages.base import StageContext
from compress.stages.quantize.int8 import Int8Options, quantize_int8

CALIB, SLICE, ACCEPT = 32, 64, 128  # ranges from 32 images, probes on the next 64, candidates judged on 128


def _images() -> np.ndarray:
    """A colour per image plus noise, (N, 3, 28, 28): global pooling keeps what differs between images."""
    rng = np.random.default_rng(0)
    shape = (CALIB + SLICE + ACCEPT, 3, 28, 28)
    return (rng.standard_normal((shape[0], 3, 1, 1)) + 0.5 * rng.standard_normal(shape)).astype(np.float32)


class _Adapter:
    """What the static path asks of a family: calibration inputs, the slice metric and compare()."""

    quality = task.QUALITY
    default_int8_method = "static"
    labelled_calibration = True

    def __init__(self, model: Path) -> None:
        import onnxruntime as ort

        self.images = _images()
        self.labels = ort.InferenceSession(str(model)).run(None, {"input": self.images})[0].argmax(1)

    def calibration_inputs(self, samples: int | None = None, batch_size: int = 1):
        n = len(self.images) if samples is None else min(samples, len(self.images))
        for start in range(0, n, batch_size):
            yield {"input": self.images[start : min(start + batch_size, n)]}

    def evaluate_calibration(self, session, start: int, stop: int, reporter) -> Evaluation:
        if stop > len(self.images):
            raise IndexError(f"data.calibration holds {len(self.images)} samples")
        predictions = session.run({"input": self.images[start:stop]})[0].argmax(1)
        top1 = 100.0 * float((predictions == self.labels[start:stop]).mean())
        return Evaluation({"top1": top1}, predictions, samples={"labels": self.labels[start:stop]})

    def compare(self, result: Evaluation, baseline: Evaluation) -> dict[str, float]:
        return task.compare(result, baseline)


@pytest.fixture(scope="module")
def fragile_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fragile") / "model.onnx"
    model = fragile_cnn()
    for bn in (model.stem[1], model.bn1, model.bn2):
        bn.momentum = None  # a cumulative average: the statistics of these images, so the features vary
    with torch.no_grad():
        model.train()(torch.from_numpy(_images()))
    return export_image_model(model, path)


def _quantize(model: Path, tmp: Path, method: dict | None = None, **keys) -> dict:
    method = {"name": "static", "calibrator": "minmax", "samples": CALIB, **(method or {})}
    options = Int8Options(precision="int8", method=method, **keys)
    artifact = SimpleNamespace(name="onnx-fp32", precision="fp32", main=model)
    ctx = StageContext(_Adapter(model), tmp, {}, None, Reporter(quiet=True), 1, 0, "test")
    out = quantize_int8(artifact, options, ctx)
    assert (tmp / out.file).is_file() and not (tmp / "_pre").exists() and not (tmp / "_probe").exists()
    return out.info


def test_the_fragile_convs_rank_first_and_go_back_to_float(fragile_onnx: Path, tmp_path: Path) -> None:
    info = _quantize(
        fragile_onnx,
        tmp_path,
        sensitivity={"samples": SLICE},
        accuracy_budget={"max_drop": 5.0, "max_fallback": 4, "samples": ACCEPT},
    )
    ranked = [row["node"] for row in info["sensitivity"]["nodes"]]
    # a fragile conv first; the spikes beside them (their output is the outlier tensor), the rest after
    assert ranked[0] in {"/fragile1/Conv", "/fragile2/Conv"}, ranked
    assert set(ranked[:4]) == {"/fragile1/Conv", "/fragile2/Conv", "/spike1/Conv", "/spike2/Conv"}, ranked
    budget = info["accuracy_budget"]
    # full INT8 rounds the outlier activation's other channels away: far over budget on the slice
    assert budget["steps"][0]["float_nodes"] == 0 and budget["steps"][0]["drop"] > 20
    assert budget["met"] and budget["drop"] <= 5.0 and budget["blocked_by"] == []
    assert [n["node"] for n in budget["float_nodes"]] == ranked[: len(budget["float_nodes"])]
    assert {"/fragile1/Conv", "/fragile2/Conv"} <= {n["node"] for n in budget["float_nodes"]}


def _search(model: Path, tmp: Path, **budget) -> dict:
    budget = {"max_drop": 5.0, "max_fallback": 4, "samples": ACCEPT, **budget}
    return _quantize(model, tmp, sensitivity={"samples": SLICE}, accuracy_budget=budget)


def test_candidates_are_judged_on_their_own_slice_with_a_paired_standard_error(
    fragile_onnx: Path, tmp_path: Path
) -> None:
    info = _search(fragile_onnx, tmp_path)
    budget = info["accuracy_budget"]
    # ranges [0, 32), probes [32, 96), candidates [96, 224): three disjoint slices
    assert info["sensitivity"]["slice"] == [CALIB, CALIB + SLICE]
    assert budget["slice"] == [CALIB + SLICE, CALIB + SLICE + ACCEPT] and budget["samples"] == ACCEPT
    assert budget["slice_reference"] == 100.0  # the labels are the float graph's own top-1
    for step in budget["steps"]:
        lost, won, n = step["lost"], step["won"], ACCEPT
        mean = (lost - won) / n
        se = 100 * ((lost + won - n * mean**2) / (n - 1) / n) ** 0.5  # sd(d) / sqrt(n), d in {-1, 0, 1}
        assert step["drop"] == pytest.approx(100 * mean, abs=1e-4) and step["se"] == pytest.approx(se, abs=1e-4)
        assert step["bound"] == step["drop"]  # sigmas 0: the decision is the estimate
    assert budget["steps"][0]["se"] > budget["steps"][-1]["se"] > 0  # fewer disagreements, a tighter estimate
    assert (budget["drop"], budget["se"]) == (budget["steps"][-1]["drop"], budget["steps"][-1]["se"])


def test_sigmas_refuses_a_candidate_whose_estimate_fits_but_not_its_error(fragile_onnx: Path, tmp_path: Path) -> None:
    for folder in "abc":
        (tmp_path / folder).mkdir()
    last = _search(fragile_onnx, tmp_path / "c")["accuracy_budget"]["steps"][-1]
    assert last["drop"] > 0 and last["se"] > 0
    between = last["drop"] + last["se"] / 2  # the estimate fits, estimate + 1 se does not
    loose = _search(fragile_onnx, tmp_path / "a", max_drop=between)["accuracy_budget"]
    assert loose["met"] and len(loose["float_nodes"]) == last["float_nodes"]
    strict = _search(fragile_onnx, tmp_path / "b", max_drop=between, sigmas=1.0)["accuracy_budget"]
    assert not strict["met"] and len(strict["steps"]) == 5 and strict["blocked_by"]
    assert strict["bound"] == pytest.approx(last["drop"] + last["se"], abs=2e-4)
    assert strict["bound"] > between


def test_full_int8_within_budget_leaves_every_node_quantized(fragile_onnx: Path, tmp_path: Path) -> None:
    budget = _search(fragile_onnx, tmp_path, max_drop=60.0)["accuracy_budget"]
    assert budget["met"] and budget["float_nodes"] == [] and len(budget["steps"]) == 1
    assert budget["steps"][0]["added"] is None and 20 < budget["drop"] <= 60.0


def test_an_acceptance_slice_past_the_data_fails_before_any_probe(fragile_onnx: Path, tmp_path: Path) -> None:
    from compress.errors import StageError

    with pytest.raises(StageError, match=r"\[97, 225\).*holds 224 samples; raise data.calibration.samples"):
        _search(fragile_onnx, tmp_path, start=CALIB + SLICE + 1)
    assert not (tmp_path / "_probe").exists()


def test_an_acceptance_slice_inside_the_ranges_or_probes_is_refused_at_validation() -> None:
    from compress.families.vision.adapter import VisionAdapter

    def problems(**budget) -> list[tuple[str, str]]:
        method = {"name": "static", "samples": 512}
        options = Int8Options(precision="int8", method=method, sensitivity={"samples": 1024}, accuracy_budget=budget)
        return options.check_family(VisionAdapter)

    (key, why), *_ = problems(max_drop=0.15, start=1535)
    assert key == "accuracy_budget" and "start 1535 overlaps the calibration samples [0, 1536)" in why
    assert "set start >= 1536" in why
    assert problems(max_drop=0.15, start=1536) == problems(max_drop=0.15) == []


def test_an_impossible_budget_keeps_the_best_candidate_and_names_the_blockers(
    fragile_onnx: Path, tmp_path: Path
) -> None:
    # one node may go back to float; both fragile convs must: the budget cannot be met
    info = _quantize(
        fragile_onnx,
        tmp_path,
        sensitivity={"samples": SLICE},
        accuracy_budget={"max_drop": 5.0, "max_fallback": 1, "samples": ACCEPT},
    )
    budget = info["accuracy_budget"]
    assert not budget["met"] and len(budget["steps"]) == 2
    assert budget["drop"] == min(step["drop"] for step in budget["steps"]) > 5.0
    ranked = [row["node"] for row in info["sensitivity"]["nodes"]]
    kept = len(budget["float_nodes"])
    assert [n["node"] for n in budget["blocked_by"]] == ranked[kept : kept + 5]  # the next ones in the ranking


def test_the_budget_gate_fails_an_unmet_budget_and_checks_the_evaluation_set() -> None:
    from compress.config import Gates
    from compress.metrics.gates import check_gates

    budget = Int8Options(precision="int8", accuracy_budget={"max_drop": 0.5})
    plan = SimpleNamespace(name="int8", input="onnx-fp32", options=budget)
    cfg = SimpleNamespace(baseline="finetune", gates=Gates(), quality=task.QUALITY, stages=(plan,))

    def records(met: bool, eval_drop: float) -> dict:
        found = {"met": met, "drop": 0.2 if met else 1.1, "float_nodes": [], "blocked_by": [{"node": "/a/Conv"}]}
        return {
            "finetune": {"artifact": {"parent": "source"}, "evaluation": {"metrics": {"top1": 90.0}}},
            "onnx-fp32": {"artifact": {"parent": "finetune"}, "evaluation": {"metrics": {"top1": 90.0}}},
            "int8": {
                "artifact": {"parent": "onnx-fp32", "info": {"accuracy_budget": found}},
                "evaluation": {"metrics": {"top1": 90.0 - eval_drop}, "vs_parent": {"top1_drop": eval_drop}},
            },
        }

    (passed,) = check_gates(cfg, records(True, 0.3))
    assert passed.gate == "accuracy_budget" and passed.status == "pass" and passed.vs == "onnx-fp32"
    (unmet,) = check_gates(cfg, records(False, 0.3))  # within bound on the test set, but the search gave up
    assert unmet.status == "fail" and "/a/Conv" in unmet.detail
    (over,) = check_gates(cfg, records(True, 0.7))  # met on the slice, not confirmed on the evaluation set
    assert over.status == "fail" and over.value == pytest.approx(0.7)


def test_the_cache_key_holds_the_budget_and_other_methods_refuse_it() -> None:
    from compress.families.causal_lm.adapter import CausalLMAdapter
    from compress.families.vision.adapter import VisionAdapter

    plain = Int8Options(precision="int8")
    tight = Int8Options(precision="int8", accuracy_budget={"max_drop": 0.15})
    loose = Int8Options(precision="int8", accuracy_budget={"max_drop": 0.3})
    keys = [plain.cache_fields(), tight.cache_fields(), loose.cache_fields()]
    assert keys[1]["accuracy_budget"] == {
        "max_drop": 0.15,
        "max_fallback": 10,
        "samples": 4096,
        "start": None,
        "sigmas": 0.0,
    }
    assert "accuracy_budget" not in keys[0] or keys[0]["accuracy_budget"] is None
    assert keys[0] != keys[1] != keys[2]
    assert tight.check_family(VisionAdapter) == []
    problems = tight.check_family(CausalLMAdapter)  # auto -> weight-only for a decoder: a perplexity budget
    assert problems == [
        ("accuracy_budget", "a decoder's budget is a perplexity rise: write {max_rise: <%>, windows: N}")
    ]
    dynamic = Int8Options(precision="int8", method="dynamic", accuracy_budget={"max_drop": 0.15})
    assert ("accuracy_budget", "applies to method static / weight-only only (method is dynamic); remove it") in (
        dynamic.check_family(CausalLMAdapter)
    )
    with pytest.raises(ValueError, match="max_drop"):
        Int8Options(precision="int8", accuracy_budget={"max_drop": -1})
    with pytest.raises(ValueError, match="extra"):
        Int8Options(precision="int8", accuracy_budget={"max_drop": 0.1, "budget": 2})


def test_the_report_section_shows_budget_steps_and_sorted_nodes(fragile_onnx: Path, tmp_path: Path) -> None:
    from compress.report import sensitivity

    info = _quantize(
        fragile_onnx,
        tmp_path,
        sensitivity={"samples": SLICE},
        accuracy_budget={"max_drop": 5.0, "max_fallback": 1, "samples": ACCEPT},
    )
    text = " ".join(sensitivity.summary(info))
    assert "**Not met** within 1 node(s)" in text and "which blocked it: `" in text
    _, steps = sensitivity.steps_rows(info)
    assert [row[0] for row in steps] == ["0", "1"]
    _, nodes = sensitivity.nodes_rows(info)
    scores = [float(row[3]) for row in nodes]
    assert scores == sorted(scores, reverse=True)
    kept = {n["node"] for n in info["accuracy_budget"]["float_nodes"]}
    assert {row[1] for row in nodes if row[-1] == "yes"} == kept  # the best candidate's float nodes are marked
    assert sensitivity.figure(info, "int8")[:8] == b"\x89PNG\r\n\x1a\n"


def _biases(path: Path) -> dict[str, np.ndarray]:
    """{Conv / Gemm node: its bias values} (INT32 codes behind a DequantizeLinear, or float)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    found = {}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2:
            bias = node.input[2]
            found[node.name] = inits[bias] if bias in inits else inits[producer[bias].input[0]]
    return found


def test_bias_correction_goes_first_and_every_candidate_keeps_the_corrected_biases(
    fragile_onnx: Path, tmp_path: Path
) -> None:
    budget = {
        "sensitivity": {"samples": SLICE},
        "accuracy_budget": {"max_drop": 5.0, "max_fallback": 4, "samples": ACCEPT},
    }
    (tmp_path / "plain").mkdir(), (tmp_path / "corrected").mkdir(), (tmp_path / "both").mkdir()
    _quantize(fragile_onnx, tmp_path / "plain", **budget)
    _quantize(fragile_onnx, tmp_path / "corrected", method={"bias_correction": True})
    info = _quantize(fragile_onnx, tmp_path / "both", method={"bias_correction": True}, **budget)
    assert info["bias_correction"]["corrected_layers"] > 0 and "before the search" in info["bias_correction"]["applied"]
    floated = {n["node"] for n in info["accuracy_budget"]["float_nodes"]}
    assert floated  # the fragile convs go back to float here too
    plain, corrected, both = (_biases(tmp_path / d / "model.onnx") for d in ("plain", "corrected", "both"))
    quantized = [n for n in both if n not in floated]
    # still-quantized layers carry the full graph's corrected INT32 codes, not the uncorrected ones
    assert all(np.array_equal(both[n], corrected[n]) for n in quantized)
    assert any(not np.array_equal(corrected[n], plain[n]) for n in quantized)
    # the float nodes keep their float bias: their correction dropped
    assert all(both[n].dtype == np.float32 for n in floated)


def test_per_tensor_calibrator_records_each_tensors_choice(fragile_onnx: Path, tmp_path: Path) -> None:
    """`calibrator: per-tensor` through the stage: the choice file is kept beside the graph and the stage info
    counts it; the graph's activation scales are the chosen ranges' (uint8: (max(hi, 0) - min(lo, 0)) / 255)."""
    import json

    import onnx

    info = _quantize(fragile_onnx, tmp_path, method={"calibrator": "per-tensor"})
    record = json.loads((tmp_path / info["range_choice_file"]).read_text())
    assert sum(info["range_choice"].values()) == len(record) >= 5
    assert info["range_choice"] == {c: [e["chosen"] for e in record.values()].count(c) for c in info["range_choice"]}
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    init = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    scales = {n.input[0]: float(init[n.input[1]]) for n in graph.node if n.op_type == "QuantizeLinear"}
    low, high = record["input"]["range"]
    assert scales["input"] == pytest.approx((max(high, 0.0) - min(low, 0.0)) / 255, rel=1e-6)
