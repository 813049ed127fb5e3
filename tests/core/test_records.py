"""Typed records (compress/records.py) and the generic quality gate: manifests round-trip through the
records, old manifests stay readable, and `quality_drop_max` works for any family that declares its
primary metric, including one registered here that neither gates.py nor config.py knows."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict
from toys import pipeline_yaml, run_quietly

from compress import registry
from compress.cli import EXIT_CONFIG, EXIT_OK, main
from compress.config import Gates, load_pipeline
from compress.errors import ConfigError
from compress.families.base import QualityMetric
from compress.families.vision.adapter import VisionAdapter
from compress.metrics.gates import Coverage, _recovery, check_gates
from compress.records import ArtifactRecord, GateRecord, RunManifest
from compress.report import markdown

STAGES = """
  - finetune: {steps: 5, lr: 1.0e-2, batch_size: 32}
  - export: {opset: 17, parity_samples: 8, name: onnx-fp32}"""

# An entry as manifest.json held it before records.py (bench of a causal-lm artifact, pre-issue-10 gate).
OLD_ENTRY = {
    "artifact": {"name": "int8", "parent": "source", "stage": "quantize", "format": "onnx", "precision": "int8"},
    "cached": True,
    "size_bytes": 1234,
    "evaluation": {"metrics": {"ppl": 15.5}, "vs_baseline": {"ppl_rise_pct": 3.3}, "vs_parent": {"agreement": 99.0}},
    "bench": {
        "latency": [{"batch_size": 1, "p50_ms": 1.0, "p90_ms": 1.1, "p99_ms": 1.2, "throughput": 9.0, "mean_ms": 1.0}],
        "backend": "onnxruntime",
        "threads": 1,
        "peak_rss_mb": 100.0,
        "llm": {
            "prefill_ms": {"32": 3.0},
            "ttft_ms": {"32": 3.5},
            "decode_tokens_per_s": {"1": 42.0},
            "decode_step_ms": {"1": 23.8},
            "decode_bound_ms": 5.0,
            "weight_mb": 12.5,
        },
    },
}
OLD_GATE = {"gate": "ppl_rise_max", "artifact": "int8", "vs": "source", "value": 3.3, "bound": "<= 5 %", "detail": "d"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory, fashion_mnist):
    """A tiny vision run (fine-tune + export) gated by `quality_drop_max`; reruns hit the cache."""
    tmp = tmp_path_factory.mktemp("records")

    def run(gates: str, *flags: str):
        pipeline = pipeline_yaml(tmp, fashion_mnist, name="r", stages=STAGES, gates=gates)
        return run_quietly(pipeline, tmp / "runs", "--no-bench", *flags)

    return SimpleNamespace(run=run, dir=tmp / "runs" / "r")


def test_quality_drop_max_gates_vision_in_top1_points_and_the_manifest_round_trips(toy) -> None:
    code, manifest, _ = toy.run("quality_drop_max: 100.0")
    assert code == EXIT_OK
    [gate] = manifest["gates"]
    assert (gate["gate"], gate["artifact"], gate["bound"], gate["status"]) == (
        "quality_drop_max",
        "onnx-fp32",
        "<= 100.0 points",
        "pass",
    )
    assert gate["detail"].startswith("top-1 ") and " vs " in gate["detail"]
    for entry in manifest["artifacts"]:  # the exact JSON the runner wrote, back from the typed record
        assert ArtifactRecord.from_json(entry).to_json() == entry
    assert [GateRecord.from_json(g).to_json() for g in manifest["gates"]] == manifest["gates"]
    assert RunManifest.from_json(manifest).to_json() == manifest
    source = RunManifest.from_json(manifest).record("source")
    assert source.evaluated and source.evaluation is None  # untrained head: evaluation pass ran, skipped it
    # `info` holds numbers; the report formats them
    manifest["artifacts"][-1]["artifact"]["info"].update(
        intermediate_size=[128, 64], kl_data={"set": "calibration", "tokens": 2048, "temperature": 1}
    )
    details = markdown.render(RunManifest.from_json(manifest)).split("## Stage details", 1)[1]
    assert "intermediate_size 128 -> 64" in details
    assert "kl_data (set calibration, tokens 2048, temperature 1)" in details
    code, manifest, _ = toy.run("quality_drop_max: 100.0", "--no-eval")  # no evaluation: the key is absent
    assert all("evaluation" not in e for e in manifest["artifacts"])
    assert RunManifest.from_json(manifest).to_json() == manifest


def test_old_manifest_entries_round_trip_and_old_run_folders_inspect(tmp_path, capsys) -> None:
    entry = ArtifactRecord.from_json(OLD_ENTRY)
    assert entry.to_json() == OLD_ENTRY
    assert entry.bench.p50_ms(1) == 1.0 and entry.bench.decode_tokens_per_s(1) == 42.0  # "1": JSON's int key
    assert entry.bench.latency[0].extra == {"mean_ms": 1.0}
    assert GateRecord.from_json({**OLD_GATE, "passed": False}).status == "fail"
    assert GateRecord.from_json({**OLD_GATE, "passed": True}).status == "pass"
    old = {  # a manifest from before issue 10: no verdict, no gate status
        "pipeline": {"name": "old", "file": "old.yaml", "family": "causal-lm"},
        "baseline": "source",
        "metric_names": ["ppl"],
        "comparisons": [{"key": "ppl_rise_pct", "label": "perplexity rise %", "sign": 1}],
        "bench_settings": {"batch_sizes": [1]},
        "artifacts": [copy.deepcopy(OLD_ENTRY)],
        "gates": [{**OLD_GATE, "passed": True}],
        "passed": True,
    }
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    assert main(["inspect", str(tmp_path), "--table", "gates"]) == EXIT_OK
    assert "| PASS | ppl_rise_max | int8 | source | 3.3 | <= 5 % |" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path), "--table", "llm"]) == EXIT_OK
    # a record made before `engine` existed shows its session (the backend) as the engine
    row = "| int8 | onnxruntime | onnxruntime | 12.5 | 3.00 | 3.50 | 42.0 | 23.80 | 5.00 | 21% | 100 |"
    assert row in capsys.readouterr().out


# -- a family gates.py and config.py do not know -------------------------------------------------------
class _FakeModel(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    family: Literal["text-encoder"]


class _FakeData(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class _CosineAdapter(VisionAdapter):
    """A stand-in for the text-encoder family: cosine similarity to FP32 as its primary metric."""

    model_options, data_options = _FakeModel, _FakeData
    metric_names = ("cosine",)
    quality = QualityMetric("cosine", "points", "cosine_drop", higher_is_better=True)
    stage_kinds = frozenset({"export"})  # the family's own declaration: no stage needs to know it

    def preflight(self) -> list:
        return []


class _LossAdapter(_CosineAdapter):
    quality = QualityMetric("loss", "%", "loss_rise_pct", higher_is_better=False)


@pytest.fixture
def text_encoder(monkeypatch):

    registry.registered_adapters()  # the real one registers first, so that the stand-in replaces it
    monkeypatch.setitem(registry._ADAPTERS, "text-encoder", _CosineAdapter)
    return "text-encoder"


def _entry(parent: str | None, metrics: dict, vs_baseline: dict | None = None) -> dict:
    return {"artifact": {"parent": parent}, "evaluation": {"metrics": metrics, "vs_baseline": vs_baseline}}


def test_quality_drop_max_applies_to_a_new_family_by_its_declaration(text_encoder) -> None:
    records = {
        "source": _entry(None, {"cosine": 100.0}),
        "int8": _entry("source", {"cosine": 98.0}, {"cosine_drop": 2.0}),
    }
    cfg = SimpleNamespace(quality=_CosineAdapter.quality, baseline="source", gates=Gates(quality_drop_max=2.5))
    [gate] = check_gates(cfg, records)
    assert (gate.gate, gate.value, gate.bound, gate.status) == ("quality_drop_max", 2.0, "<= 2.5 points", "pass")
    assert gate.detail == "cosine 98.000 vs 100.000"
    cfg = SimpleNamespace(quality=_CosineAdapter.quality, baseline="source", gates=Gates(quality_drop_max=1.0))
    assert [g.status for g in check_gates(cfg, records)] == ["fail"]
    bare = {name: {"artifact": rec["artifact"]} for name, rec in records.items()}
    [gate] = check_gates(cfg, bare, Coverage(evaluation_off="--no-eval"))
    assert gate.status == "not-checked" and gate.detail == "evaluation disabled (--no-eval)"


def test_recovery_follows_the_declared_direction_not_the_metric_name() -> None:
    # lower loss is better: 1.0 -> 3.0 after pruning, 2.0 after distillation wins back half
    records = {n: _entry(None, {"loss": v}) for n, v in (("source", 1.0), ("prune", 3.0), ("distill", 2.0))}
    g = _recovery("distill", "prune", 0.5, "source", records, _LossAdapter.quality)
    assert g.value == pytest.approx(0.5) and g.status == "pass"
    flipped = QualityMetric("loss", "%", "loss_rise_pct", higher_is_better=True)  # same numbers, other direction
    assert _recovery("distill", "prune", 0.5, "source", records, flipped).detail.endswith("(prune lost nothing)")


PIPELINE = """name: t
model: {family: %s, source: "python:toys:tiny_cnn"}
data: {}
stages:
  - export: {}
gates: %s
"""


def test_config_takes_quality_drop_max_for_a_new_family_and_refuses_aliases(tmp_path: Path, text_encoder) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE % (text_encoder, "{quality_drop_max: 1.0}"))
    assert load_pipeline(path).gates.quality_bound() == ("quality_drop_max", 1.0)
    path.write_text(PIPELINE % (text_encoder, "{top1_drop_max: 1.0}"))
    with pytest.raises(
        ConfigError, match="gates.top1_drop_max: does not apply to family 'text-encoder'; use quality_drop_max"
    ):
        load_pipeline(path)


@pytest.mark.parametrize(
    "gates, message",
    [
        (
            "{decode_speedup_min: {artifact: export, at_least: 2}}",
            "gates.decode_speedup_min: applies to families that decode (causal-lm) only; use speedup_min",
        ),
        ("{quality_drop_max: 1.0, top1_drop_max: 1.0}", "gates.top1_drop_max: the same bound as quality_drop_max"),
        (
            "{ppl_rise_max: 1.0}",
            "gates.ppl_rise_max: does not apply to family 'vision'; use top1_drop_max or quality_drop_max",
        ),
        ("{quality_drop_max: -1}", "gates.quality_drop_max = -1: Input should be greater than or equal to 0"),
    ],
)
def test_config_refuses_two_quality_bounds_and_another_familys_alias(tmp_path, gates, message) -> None:
    from test_config import GOOD

    path = tmp_path / "p.yaml"
    path.write_text(GOOD.replace("{top1_drop_max: 1.0}", gates))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_pipeline(path)
    assert main(["validate", str(path)]) == EXIT_CONFIG
