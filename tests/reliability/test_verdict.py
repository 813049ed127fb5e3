"""The verdict is honest (issue 10): a gate that could not be checked is not a pass, a crash is not a breach,
and a run folder never shows an earlier run's verdict after a later run failed.

One tiny pipeline (a few fine-tune steps, FP32 export, TensorRT-style INT8, an optional engine that skips
on a machine without TensorRT) is built once; every test reruns it from cache with other gates or faults.
"""

from __future__ import annotations

import dataclasses
import errno
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from toys import pipeline_yaml

from compress import registry
from compress.cli import EXIT_GATE, EXIT_INCOMPLETE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, main
from compress.gpu.availability import gpu_status
from compress.report import markdown, plots
from compress.runner import Runner

STAGES = """
  - finetune: {steps: 5, lr: 1.0e-2, batch_size: 32}
  - export: {opset: 17, parity_samples: 8, name: onnx-fp32}
  - quantize: {precision: int8, target: tensorrt, method: {name: static, samples: 32}, name: int8}
  - engine: {precision: int8, optional: true}"""
PASSING = "top1_drop_max: 100.0"
NO_TRT = pytest.mark.skipif(gpu_status("tensorrt").available, reason="TensorRT is here: the engine is built")


@pytest.fixture(scope="module")
def toy(tmp_path_factory, fashion_mnist):
    """Builds every artifact once (exit 0: the loose gate holds); returns a runner of the same pipeline."""
    tmp = tmp_path_factory.mktemp("verdict")

    def run(gates: str = PASSING, *flags: str) -> int:
        pipeline = pipeline_yaml(tmp, fashion_mnist, name="v", stages=STAGES, gates=gates)
        return main(["run", str(pipeline), "--runs-dir", str(tmp / "runs"), "--quiet", "--no-bench", *flags])

    assert run() == EXIT_OK
    return SimpleNamespace(run=run, dir=tmp / "runs" / "v")


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def _crash_stage(monkeypatch, kind: str, exc: BaseException) -> None:
    def crash(artifact, options, ctx):
        (ctx.outdir / "model.onnx").write_bytes(b"half a file")
        raise exc

    monkeypatch.setitem(registry._STAGES, kind, dataclasses.replace(registry._STAGES[kind], run=crash))


# -- a gate that could not be checked is not a pass ---------------------------------------------------
def test_no_eval_leaves_the_accuracy_gate_unchecked(toy, capsys) -> None:
    assert toy.run(PASSING, "--no-eval") == EXIT_INCOMPLETE
    manifest = _manifest(toy.dir)
    assert manifest["verdict"] == "INCOMPLETE" and manifest["passed"] is False
    [gate] = manifest["gates"]
    assert gate["status"] == "not-checked" and gate["detail"] == "evaluation disabled (--no-eval)"
    report = (toy.dir / "report.md").read_text()
    assert report.startswith("# v: INCOMPLETE — 1 gate not checked")
    assert "INCOMPLETE: 1 gate not checked" in report and "- top1_drop_max on `int8`: evaluation disabled" in report
    assert "INCOMPLETE — 1 gate not checked" in capsys.readouterr().err
    assert main(["inspect", str(toy.dir), "--table", "gates"]) == EXIT_OK
    table = capsys.readouterr().out
    assert table.startswith("| status | gate |") and "| not checked | top1_drop_max | int8 |" in table


def test_no_bench_leaves_a_speed_gate_unchecked_not_breached(toy) -> None:
    assert toy.run("speedup_min: {artifact: int8, vs: onnx-fp32, at_least: 0.01}") == EXIT_INCOMPLETE
    [gate] = _manifest(toy.dir)["gates"]
    assert gate["status"] == "not-checked" and "benchmarks disabled (--no-bench)" in gate["detail"]


def test_recovery_gate_without_evaluation_is_unchecked(toy) -> None:
    gates = "recovery_min: {artifact: int8, lost_by: onnx-fp32, at_least: 0.5}"
    assert toy.run(gates, "--no-eval") == EXIT_INCOMPLETE
    assert [g["status"] for g in _manifest(toy.dir)["gates"]] == ["not-checked"]


@NO_TRT
def test_metric_gate_on_a_skipped_engine_is_unchecked(toy) -> None:
    assert toy.run("{top1_drop_max: 100.0, metric_gates_on: [engine]}") == EXIT_INCOMPLETE
    [gate] = _manifest(toy.dir)["gates"]
    assert gate["artifact"] == "engine" and gate["status"] == "not-checked"
    assert gate["detail"].startswith("'engine' was skipped (the package 'tensorrt' is not installed")


def test_a_breach_outranks_a_gate_not_checked(toy) -> None:
    gates = "{top1_drop_max: 100.0, size_ratio_max: {artifact: int8, vs: onnx-fp32, at_most: 0.01}}"
    assert toy.run(gates, "--no-eval") == EXIT_GATE
    manifest = _manifest(toy.dir)
    assert manifest["verdict"] == "FAIL"
    assert sorted(g["status"] for g in manifest["gates"]) == ["fail", "not-checked"]
    report = (toy.dir / "report.md").read_text()
    assert "Breached: size_ratio_max on `int8`" in report and "Also: 1 gate not checked" in report


def test_missing_metric_and_perplexity_gate_without_evaluation() -> None:
    from compress.config import Gates
    from compress.families.causal_lm.adapter import CausalLMAdapter
    from compress.metrics.gates import Coverage, check_gates

    records = {
        "source": {"artifact": {"parent": None}, "evaluation": {"metrics": {"ppl": 15.0}}},
        "int8": {"artifact": {"parent": "source"}, "evaluation": {"metrics": {"ppl": 15.5}, "vs_baseline": {}}},
    }
    cfg = SimpleNamespace(baseline="source", gates=Gates(ppl_rise_max=10.0), quality=CausalLMAdapter.quality)
    [gate] = check_gates(cfg, records)
    assert gate.status == "not-checked" and gate.detail == "metric 'ppl_rise_pct' missing from the evaluation of 'int8'"
    bare = {name: {"artifact": rec["artifact"]} for name, rec in records.items()}
    [gate] = check_gates(cfg, bare, Coverage(evaluation_off="--no-eval"))
    assert gate.status == "not-checked" and gate.detail == "evaluation disabled (--no-eval)"


# -- a crash is not a breach --------------------------------------------------------------------------
def test_crash_after_a_pass_exits_5_and_withdraws_the_verdict(toy, monkeypatch, capsys) -> None:
    assert toy.run() == EXIT_OK and _manifest(toy.dir)["verdict"] == "PASS"
    capsys.readouterr()
    _crash_stage(monkeypatch, "quantize", RuntimeError("scale tensor is empty"))
    assert toy.run(PASSING, "--force", "int8") == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        "internal error during stage quantize (int8): RuntimeError: scale tensor is empty. "
        f"The full traceback is in {toy.dir / 'run.log'}. This is a bug in compress; please report it with the log."
    ) in err
    report = (toy.dir / "report.md").read_text()
    assert "PASS" not in report and report.startswith("# v: run failed — no verdict")
    assert "failed during stage quantize (int8): `RuntimeError: scale tensor is empty`" in report
    manifest = _manifest(toy.dir)
    assert manifest["verdict"] is None and manifest["passed"] is False and manifest["gates"] == []
    assert manifest["run"] == {
        "state": "failed",
        "step": "stage quantize (int8)",
        "error": "RuntimeError: scale tensor is empty",
    }
    log = (toy.dir / "run.log").read_text()
    last = log.rsplit("===== compress run ", 1)[1]  # one header per run, appended
    assert (
        "run        int8 (quantize from onnx-fp32)" in last
        and "----- failed during stage quantize (int8) -----" in last
    )
    assert "Traceback (most recent call last)" in last and "RuntimeError: scale tensor is empty" in last
    assert log.count("===== compress run ") >= 2 and "PASS — all gates hold" in log  # the earlier run is kept
    assert (toy.dir / "int8" / "artifact.json").is_file() and not list(toy.dir.glob(".*tmp*"))


def test_debug_prints_the_traceback(toy, monkeypatch, capsys) -> None:
    _crash_stage(monkeypatch, "quantize", RuntimeError("scale tensor is empty"))
    pipeline = toy.dir.parent.parent / "v.yaml"
    runs = str(toy.dir.parent)
    assert (
        main(["--debug", "run", str(pipeline), "--runs-dir", runs, "--quiet", "--no-bench", "--force", "int8"])
        == EXIT_INTERNAL
    )
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "internal error during stage quantize (int8)" in err


def test_internal_error_outside_a_run_points_to_debug(monkeypatch, tmp_path, capsys) -> None:
    from compress import cli

    monkeypatch.setattr(cli, "_list_stages", lambda: {}["missing"])
    assert main(["list-stages"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.startswith("internal error: KeyError: 'missing'. Run again with --debug for the full traceback.")


def test_ctrl_c_is_one_line_exit_130_and_the_next_run_resumes(toy, monkeypatch, capsys) -> None:
    with monkeypatch.context() as patch:
        _crash_stage(patch, "quantize", KeyboardInterrupt())
        assert toy.run(PASSING, "--force", "int8") == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"interrupted; finished artifacts are kept in {toy.dir}"
    assert "Traceback" not in err
    assert not list(toy.dir.glob(".*tmp*"))  # the stage's temporary folder is gone
    assert (toy.dir / "report.md").read_text().startswith("# v: run interrupted — no verdict")
    assert _manifest(toy.dir)["run"]["state"] == "interrupted"
    assert toy.run() == EXIT_OK
    assert "cache hit  int8 (quantize)" in capsys.readouterr().err


def test_failure_after_the_gates_keeps_the_verdict(toy, monkeypatch, capsys) -> None:
    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plots, "plot_accuracy_vs_latency", full_disk)
    # The plot is drawn only with benchmark results: every artifact gets a (fake) one.
    lat = {"batch_size": 1, "p50_ms": 1.0, "p90_ms": 1.1, "p99_ms": 1.2, "throughput": 1000.0}
    bench = {"latency": [lat], "backend": "onnxruntime", "threads": 1, "peak_rss_mb": 100.0}

    def fake_bench(self, measure: bool) -> None:
        for rec in self.records.values():
            rec["bench"] = bench

    monkeypatch.setattr(Runner, "_bench_all", fake_bench)
    gates = "{top1_drop_max: 100.0, size_ratio_max: {artifact: int8, vs: onnx-fp32, at_most: 0.01}}"
    assert toy.run(gates) == EXIT_GATE  # the verdict's code, not an internal error
    err = capsys.readouterr().err
    assert f"warning: could not write {toy.dir / 'accuracy_vs_latency.png'}: OSError: [Errno 28]" in err
    assert (toy.dir / "report.md").read_text().startswith("# v: FAIL")
    # report.md itself on a full disk: the verdict still decides the exit code, and the report says no verdict
    monkeypatch.setattr(markdown, "render", full_disk)
    assert toy.run() == EXIT_OK
    err = capsys.readouterr().err
    assert f"warning: could not write {toy.dir / 'report.md'}: OSError" in err
    assert "PASS — all gates hold; report.md not written (see the warning above)" in err
    assert (toy.dir / "report.md").read_text().startswith("# v: run in progress — no verdict")
    assert _manifest(toy.dir)["verdict"] == "PASS"


# -- an internal invariant is a bug (exit 5), not a bad pipeline file (exit 2) --------------------------
def test_quant_invariants_raise_internal_errors() -> None:
    import torch

    from compress.errors import CompressError
    from compress.quant.algorithms.rtn import rtn_quantize
    from compress.quant.primitives.packing import pack_matmul_nbits
    from compress.quant.primitives.weight import QuantizedWeight, WeightQuantConfig

    qw = rtn_quantize(torch.randn(8, 32), WeightQuantConfig(group_size=32))
    overflow = dataclasses.replace(qw, zeros=torch.full_like(qw.zeros, 16))  # 16 does not fit in 4 bits
    with pytest.raises(ValueError, match="zero point 16 does not fit in 4 bits") as err:
        pack_matmul_nbits(overflow)
    assert not isinstance(err.value, CompressError)
    with pytest.raises(ValueError, match="do not match qweight"):
        QuantizedWeight(qw.qweight, qw.scales[:, :0], qw.zeros, 32, 4)  # (8, 0) scales for one group of 32


def test_inconsistent_gptq_checkpoint_is_a_value_error_naming_the_folder(tmp_path) -> None:
    """A checkpoint folder is user input: tensors that contradict each other get a ValueError naming it."""
    import torch
    from safetensors.numpy import load_file, save_file

    from compress.quant.algorithms.checkpoint import read_gptq_checkpoint, write_gptq_checkpoint
    from compress.quant.algorithms.rtn import rtn_quantize
    from compress.quant.primitives.weight import WeightQuantConfig

    qw = rtn_quantize(torch.randn(16, 64), WeightQuantConfig(group_size=32, symmetric=True))
    write_gptq_checkpoint(tmp_path, {"fc": qw}, checkpoint_format="gptq_v2")
    [file] = tmp_path.glob("*.safetensors")
    tensors = load_file(str(file))
    tensors["fc.scales"] = tensors["fc.scales"][:1]  # one group of scales where the weight has two
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=f"{tmp_path}: fc: scales"):
        read_gptq_checkpoint(tmp_path)
