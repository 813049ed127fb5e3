"""Pipeline-file validation: every mistake is reported with file:line, key path and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.config import load_pipeline
from compress.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

GOOD = """name: t
model: {family: vision, source: "python:toys:tiny_cnn", num_classes: 10, input_size: 28}
data:
  dataset: %s
  train: {split: train, samples: 100}
  calibration: {split: train, samples: 10}
  evaluation: {split: test, samples: 10}
stages:
  - finetune: {steps: 1}
  - export: {}
  - quantize: {precision: int8}
gates: {top1_drop_max: 1.0}
""" % (REPO / "calibration" / "fashion-mnist.yaml")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_pipeline(_write(tmp_path, text))
    return str(info.value)


@pytest.mark.parametrize("pipeline", sorted((REPO / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_pipeline_validates(pipeline: Path) -> None:
    cfg = load_pipeline(pipeline)
    assert cfg.stages and cfg.baseline


def test_good_pipeline_resolves_names_and_baseline(tmp_path: Path) -> None:
    cfg = load_pipeline(_write(tmp_path, GOOD))
    assert [(p.kind, p.name, p.input, p.output_format) for p in cfg.stages] == [
        ("finetune", "finetune", "source", "torch"),
        ("export", "export", "finetune", "onnx"),
        ("quantize", "quantize", "export", "onnx"),
    ]
    assert cfg.baseline == "finetune"


def test_unknown_key_names_line_path_and_allowed_keys(tmp_path: Path) -> None:
    msg = _error(tmp_path, GOOD.replace("- export: {}", "- export: {opsett: 17}"))
    assert "p.yaml:10: stages[1].export.opsett: unknown key" in msg
    assert "opset" in msg and "parity_samples" in msg


def test_wrong_choice_lists_allowed_values(tmp_path: Path) -> None:
    msg = _error(
        tmp_path, GOOD.replace("{precision: int8}", "{precision: int8, method: {name: static, calibrator: kl}}")
    )
    assert "stages[2].quantize.method.calibrator = 'kl'" in msg
    assert "'minmax', 'entropy', 'percentile' or 'per-tensor'" in msg


def test_wrong_type_and_unknown_stage_reported_together(tmp_path: Path) -> None:
    text = GOOD.replace("- finetune: {steps: 1}", "- finetune: {steps: many}").replace("- export: {}", "- exprot: {}")
    msg = _error(tmp_path, text)
    assert "2 problems" in msg
    assert "stages[0].finetune.steps = 'many'" in msg
    assert "unknown stage 'exprot'; allowed:" in msg and "export" in msg


def test_stage_that_cannot_follow(tmp_path: Path) -> None:
    msg = _error(tmp_path, GOOD.replace("  - export: {}\n", ""))
    assert "stages[1].quantize: cannot follow 'finetune' (torch): it starts from onnx; add an export stage" in msg


def test_unknown_input_and_gate_artifact(tmp_path: Path) -> None:
    text = GOOD.replace("{precision: int8}", "{precision: int8, input: nope}").replace(
        "{top1_drop_max: 1.0}", "{speedup_min: {artifact: int9, at_least: 2}}"
    )
    msg = _error(tmp_path, text)
    assert "stages[2].quantize.input = 'nope': no earlier artifact of that name" in msg
    assert "gates.speedup_min[0].artifact = 'int9': no artifact of that name" in msg


def test_missing_files_and_unknown_source(tmp_path: Path) -> None:
    text = GOOD.replace('"python:toys:tiny_cnn"', '"magic:thing", weights: /no/such.pth').replace(
        str(REPO / "calibration" / "fashion-mnist.yaml"), "/no/such/dataset.yaml"
    )
    msg = _error(tmp_path, text)
    assert "model.source: unknown scheme 'magic'" in msg
    assert "model.weights: '/no/such.pth': no such file" in msg
    assert "data.dataset: '/no/such/dataset.yaml': no such dataset definition" in msg


def test_family_gate_mismatch_and_unknown_family(tmp_path: Path) -> None:
    msg = _error(tmp_path, GOOD.replace("{top1_drop_max: 1.0}", "{ppl_rise_max: 1.0}"))
    assert "gates.ppl_rise_max: does not apply to family 'vision'; use top1_drop_max" in msg
    msg = _error(tmp_path, GOOD.replace("family: vision", "family: audio"))
    assert "model.family = 'audio': unknown family; allowed: causal-lm, text-encoder, vision" in msg


def test_duplicate_key_and_bad_yaml(tmp_path: Path) -> None:
    assert "duplicate key 'name'" in _error(tmp_path, "name: a\nname: b\n")
    assert "not valid YAML" in _error(tmp_path, "name: [\n")
    with pytest.raises(ConfigError, match="no such file"):
        load_pipeline(tmp_path / "missing.yaml")


def test_recovery_gate_names_are_checked(tmp_path: Path) -> None:
    text = GOOD.replace("{top1_drop_max: 1.0}", "{recovery_min: {artifact: quantize, lost_by: pruned, at_least: 0.5}}")
    msg = _error(tmp_path, text)
    assert "gates.recovery_min[0].lost_by = 'pruned': no artifact of that name" in msg
    # 'baseline' stands for the baseline only in `vs`; a recovery from the baseline is no artifact's loss
    gate = "{recovery_min: {artifact: quantize, lost_by: baseline, at_least: 0.5}}"
    text = GOOD.replace("{top1_drop_max: 1.0}", gate)
    assert "gates.recovery_min[0].lost_by = 'baseline': no artifact of that name" in _error(tmp_path, text)
    ok = GOOD.replace("{top1_drop_max: 1.0}", "{recovery_min: {artifact: quantize, lost_by: export, at_least: 0.5}}")
    assert load_pipeline(_write(tmp_path, ok)).gates.recovery_min[0].at_least == 0.5


def test_a_stage_the_family_does_not_declare_is_refused(tmp_path: Path, monkeypatch) -> None:
    from compress.families.vision.adapter import VisionAdapter

    monkeypatch.setattr(VisionAdapter, "stage_kinds", frozenset({"export", "quantize"}))
    msg = _error(tmp_path, GOOD)
    assert "p.yaml:9: stages[0].finetune: not available for family 'vision' (it takes: export, quantize)" in msg


def test_family_declarations_name_registered_stages_and_distillation_tasks() -> None:
    from typing import get_args

    from compress.distill.options import DistillOptions
    from compress.distill.tasks import TASKS
    from compress.registry import registered_adapters, registered_stages

    assert set(get_args(DistillOptions.model_fields["task"].annotation)) == set(TASKS)
    declared = {}
    for family, adapter in registered_adapters().items():
        assert adapter.stage_kinds <= set(registered_stages()), family
        assert (adapter.distill_task is not None) == ("distill" in adapter.stage_kinds), family
        assert adapter.distill_task is None or adapter.distill_task in TASKS, family
        declared[family] = sorted(adapter.stage_kinds)
    assert declared["text-encoder"] == ["export", "quantize"]
    assert declared["causal-lm"] == ["distill", "export", "prune", "quantize"]
