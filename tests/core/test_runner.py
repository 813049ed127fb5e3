"""The runner end to end on a tiny CNN and real Fashion-MNIST slices: artifacts, cache, resume, gates."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from toys import pipeline_yaml

from compress import registry
from compress.cli import EXIT_GATE, EXIT_OK, EXIT_STAGE, main
from compress.config import load_pipeline
from compress.errors import StageError
from compress.progress import Reporter
from compress.registry import registered_stages
from compress.runner import Runner


def _patch_stage(monkeypatch, kind: str, fn) -> None:
    monkeypatch.setitem(registry._STAGES, kind, dataclasses.replace(registry._STAGES[kind], run=fn))


def _run(pipeline: Path, runs: Path, **kw) -> Runner:
    runner = Runner(load_pipeline(pipeline), runs_dir=runs, reporter=Reporter(quiet=True), **kw)
    runner.result = runner.run()
    return runner


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, fashion_mnist):
    tmp = tmp_path_factory.mktemp("e2e")
    pipeline = pipeline_yaml(
        tmp, fashion_mnist, gates="top1_drop_max: 5.0\n  speedup_min: {artifact: int8, vs: baseline, at_least: 1.0}"
    )
    return pipeline, tmp / "runs", _run(pipeline, tmp / "runs")


def test_end_to_end_outputs(first_run) -> None:
    _, runs, runner = first_run
    run_dir = runs / "toy"
    for name in ("source", "finetune", "onnx-fp32", "int8", "int8-trt"):
        assert (run_dir / name / "artifact.json").is_file()
    onnx.checker.check_model(str(run_dir / "int8" / "model.onnx"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    records = {r["artifact"]["name"]: r for r in manifest["artifacts"]}
    # the fine-tuned tiny CNN learns something on 960 images (chance is 10%)
    assert records["finetune"]["evaluation"]["metrics"]["top1"] > 30.0
    # the source's new head is untrained, so it is not evaluated
    assert records["source"]["evaluation"] is None
    # FP32 ONNX computes the same function as torch: predictions agree on (nearly) every sample
    assert records["onnx-fp32"]["evaluation"]["vs_baseline"]["agreement"] >= 99.0
    assert records["int8"]["artifact"]["precision"] == "int8"
    assert records["int8-trt"]["artifact"]["info"]["tensorrt_rules"] == "passed"
    # a TensorRT-target graph is evaluated on CPU as TensorRT computes it: Q/DQ unfused, float ops between
    assert records["int8-trt"]["artifact"]["info"]["ort_session_config"] == {"session.disable_quant_qdq": "1"}
    assert {g["gate"] for g in manifest["gates"]} == {"top1_drop_max", "speedup_min"}
    assert manifest["passed"] is runner.result.passed
    report = (run_dir / "report.md").read_text()
    assert "| int8 |" in report and "## Gates" in report
    assert (run_dir / "accuracy_vs_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "pipeline.resolved.json").is_file()
    assert np.load(run_dir / "int8" / "_predictions.npy").shape == (300,)


def test_second_run_is_all_cache_hits(first_run, monkeypatch) -> None:
    pipeline, runs, _ = first_run
    before = {p: p.stat().st_mtime_ns for p in (runs / "toy").glob("*/model.*")}
    calls = []
    for kind in registered_stages():
        _patch_stage(monkeypatch, kind, lambda *a, _k=kind: calls.append(_k))
    runner = _run(pipeline, runs)
    assert calls == []
    assert all(rec["cached"] for rec in runner.records.values())
    assert before == {p: p.stat().st_mtime_ns for p in (runs / "toy").glob("*/model.*")}


def test_changed_option_rebuilds_that_stage_and_its_children_only(first_run, tmp_path) -> None:
    pipeline, runs, _ = first_run
    text = pipeline.read_text().replace(
        "method: {name: static, calibrator: minmax, samples: 64}, name: int8}",
        "method: {name: static, calibrator: minmax, samples: 32}, name: int8}",
    )
    changed = pipeline.with_name("toy-changed.yaml")
    changed.write_text(text)
    runner = _run(changed, runs, bench=False, evaluate=False)
    rebuilt = {name for name, rec in runner.records.items() if not rec["cached"]}
    assert rebuilt == {"int8"}


def test_killed_stage_leaves_earlier_artifacts_and_resumes(tmp_path, fashion_mnist, monkeypatch) -> None:
    pipeline = pipeline_yaml(tmp_path, fashion_mnist, name="kill")

    def killed(artifact, options, ctx):
        (ctx.outdir / "model.onnx").write_bytes(b"half a file")
        raise KeyboardInterrupt  # what Ctrl-C or a kill looks like from inside the stage

    with monkeypatch.context() as patch:
        _patch_stage(patch, "quantize", killed)
        with pytest.raises(KeyboardInterrupt):
            _run(pipeline, tmp_path / "runs", bench=False)
    run_dir = tmp_path / "runs" / "kill"
    assert (run_dir / "finetune" / "artifact.json").is_file() and (run_dir / "onnx-fp32" / "artifact.json").is_file()
    assert not (run_dir / "int8").exists()
    assert not list(run_dir.glob(".*tmp*"))  # no half-written folder left behind

    runner = _run(pipeline, tmp_path / "runs", bench=False)
    assert runner.records["finetune"]["cached"] and runner.records["onnx-fp32"]["cached"]
    assert not runner.records["int8"]["cached"]
    assert (run_dir / "int8" / "artifact.json").is_file()


def test_breached_gate_exits_1_and_report_names_it(tmp_path, fashion_mnist) -> None:
    pipeline = pipeline_yaml(
        tmp_path, fashion_mnist, name="gate", gates="size_ratio_max: {artifact: int8, vs: onnx-fp32, at_most: 0.01}"
    )
    code = main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"])
    assert code == EXIT_GATE
    report = (tmp_path / "runs" / "gate" / "report.md").read_text()
    assert "FAIL" in report and "size_ratio_max on `int8`" in report
    # the same pipeline with a bound it meets passes
    ok = pipeline_yaml(
        tmp_path, fashion_mnist, name="gate", gates="size_ratio_max: {artifact: int8, vs: onnx-fp32, at_most: 0.9}"
    )
    assert main(["run", str(ok), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"]) == EXIT_OK


def test_export_parity_failure_fails_the_stage(tmp_path, fashion_mnist) -> None:
    pipeline = pipeline_yaml(
        tmp_path,
        fashion_mnist,
        name="noisy",
        source="python:toys:noisy_cnn",
        stages="\n  - export: {opset: 17}",
        gates="{}",
    )
    with pytest.raises(StageError, match="export parity failed"):
        _run(pipeline, tmp_path / "runs", bench=False, evaluate=False)
    assert main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == EXIT_STAGE
    assert not (tmp_path / "runs" / "noisy" / "export").exists()


def test_int8_keeps_accuracy_of_fp32_onnx(first_run) -> None:
    _, _, runner = first_run
    # per-channel INT8 of a small CNN: the top-1 class rarely changes (300 images, 90% leaves 30 flips)
    assert runner.records["int8"]["evaluation"]["vs_parent"]["agreement"] >= 90.0
    assert runner.records["int8-trt"]["evaluation"]["vs_parent"]["agreement"] >= 90.0
