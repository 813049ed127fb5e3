"""Gates: the recovery gate (the share of a lossy stage's quality loss that a later artifact wins back),
which artifacts the metric gates apply to, and the verdict over pass / fail / not-checked."""

from __future__ import annotations

import pytest

from compress.families.causal_lm.adapter import CausalLMAdapter
from compress.families.vision.adapter import VisionAdapter
from compress.metrics.gates import _recovery

PPL, TOP1 = CausalLMAdapter.quality, VisionAdapter.quality


def _records(metric: str, **values: float) -> dict:
    return {name: {"evaluation": {"metrics": {metric: v}}} for name, v in values.items()}


def test_perplexity_recovery_is_the_share_of_the_rise_won_back() -> None:
    # pruning took perplexity 15 -> 115; distillation back to 55: (115 - 55) / (115 - 15) = 0.6
    g = _recovery("distill", "prune", 0.5, "source", _records("ppl", source=15.0, prune=115.0, distill=55.0), PPL)
    assert g.value == pytest.approx(0.6) and g.status == "pass"
    g = _recovery("distill", "prune", 0.5, "source", _records("ppl", source=15.0, prune=115.0, distill=70.0), PPL)
    assert g.value == pytest.approx(0.45) and g.status == "fail"
    assert "ppl: source 15.00, prune 115.00, distill 70.00" in g.detail


def test_top1_recovery_and_edge_cases() -> None:
    g = _recovery("distill", "prune", 0.5, "finetune", _records("top1", finetune=90.0, prune=70.0, distill=88.0), TOP1)
    assert g.value == pytest.approx(0.9) and g.status == "pass"
    # nothing lost: nothing to win back, the gate holds and says why
    g = _recovery("distill", "prune", 0.5, "finetune", _records("top1", finetune=90.0, prune=90.5, distill=89.0), TOP1)
    assert g.status == "pass" and g.value is None and "lost nothing" in g.detail
    # an artifact without an evaluation: the gate is not checked (never a pass), and says which one
    records = {**_records("top1", finetune=90.0, prune=70.0), "distill": {"evaluation": None}}
    g = _recovery("distill", "prune", 0.5, "finetune", records, TOP1)
    assert g.status == "not-checked" and not g.passed and "'distill' is not evaluated" in g.detail


def test_metric_gates_on_empty_gates_nothing_and_unset_gates_branch_ends() -> None:
    from types import SimpleNamespace

    from compress.config import Gates
    from compress.metrics.gates import check_gates

    def rec(parent, top1):
        return {
            "artifact": {"parent": parent},
            "evaluation": {"metrics": {"top1": top1}, "vs_baseline": {"top1_drop": 90.0 - top1}},
        }

    records = {"finetune": rec("source", 90.0), "prune": rec("finetune", 10.0), "distill": rec("prune", 89.5)}
    unset = SimpleNamespace(baseline="finetune", gates=Gates(top1_drop_max=1.0), quality=TOP1)
    assert [(g.artifact, g.status) for g in check_gates(unset, records)] == [("distill", "pass")]  # prune: intermediate
    none = SimpleNamespace(baseline="finetune", gates=Gates(top1_drop_max=1.0, metric_gates_on=[]), quality=TOP1)
    assert check_gates(none, records) == []


def test_verdict_is_pass_only_when_every_gate_was_checked_and_holds() -> None:
    from compress.metrics.gates import verdict
    from compress.records import GateRecord

    def g(status: str) -> GateRecord:
        return GateRecord("speedup_min", "int8", "onnx", None, ">= 1x", status, "")

    assert verdict([]) == "PASS"
    assert verdict([g("pass"), g("pass")]) == "PASS"
    assert verdict([g("pass"), g("not-checked")]) == "INCOMPLETE"
    assert verdict([g("not-checked"), g("fail"), g("pass")]) == "FAIL"  # a breach outranks what was not checked
    assert g("not-checked").to_json()["passed"] is False


def test_an_artifact_this_machine_cannot_run_is_not_checked_with_its_reason() -> None:
    records = {
        **_records("ppl", source=15.0, prune=115.0),
        "gpu": {"artifact": {"unmeasured": "needs an NVIDIA GPU"}, "evaluation": None},
    }
    g = _recovery("gpu", "prune", 0.5, "source", records, PPL)
    assert g.status == "not-checked" and "'gpu' is not evaluated (needs an NVIDIA GPU)" in g.detail
