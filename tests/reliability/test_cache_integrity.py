"""Integrity of the cache: a damaged artifact, evaluation or benchmark is found, named and rebuilt, never reused.

One tiny run (fine-tune, export, INT8) is built once per module; each test corrupts a copy of its folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from toys import pipeline_yaml, run_quietly, tiny_cnn

from compress import registry, runner
from compress.cli import EXIT_OK
from compress.hashing import cached_sha256, sha256_file

STAGES = """
  - finetune: {steps: 10, lr: 1.0e-2, batch_size: 32}
  - export: {opset: 17, name: onnx-fp32}
  - quantize: {precision: int8, method: {name: static, calibrator: minmax, samples: 64}, name: int8}"""
ALL = ("source", "finetune", "onnx-fp32", "int8")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, fashion_mnist) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("cache")
    pipeline = pipeline_yaml(tmp, fashion_mnist, stages=STAGES)
    code, _, _ = run_quietly(pipeline, tmp / "runs", "--no-bench")
    assert code == EXIT_OK
    return pipeline, tmp / "runs"


@pytest.fixture
def runs(base_run, tmp_path) -> Path:
    """A private copy of the module's run folder."""
    return Path(shutil.copytree(base_run[1], tmp_path / "runs", symlinks=True))


def _rerun(pipeline: Path, runs: Path, capsys, *flags: str) -> tuple[dict[str, dict], str]:
    capsys.readouterr()
    code, _, records = run_quietly(pipeline, runs, "--no-bench", *flags)
    log = capsys.readouterr().err
    assert code == EXIT_OK, log
    return records, log


def _rebuilt(records: dict[str, dict]) -> set[str]:
    return {name for name, rec in records.items() if not rec["cached"]}


def _flip_middle(path: Path) -> None:
    """Overwrite bytes in the middle of a file: same size, new content, new mtime."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])
    path.write_bytes(bytes(data))


def _recorded_sha(records: dict[str, dict], name: str, rel: str) -> str:
    return records[name]["artifact"]["files"][rel]["sha256"]


def test_truncated_model_is_rebuilt_and_reevaluated(base_run, runs, capsys) -> None:
    model = runs / "toy" / "int8" / "model.onnx"
    size = model.stat().st_size
    os.truncate(model, size // 2)
    records, log = _rerun(base_run[0], runs, capsys)
    assert f"int8/model.onnx: size {size // 2} != recorded {size}: rebuilding" in log
    assert _rebuilt(records) == {"int8"}
    assert model.stat().st_size == size and sha256_file(model) == _recorded_sha(records, "int8", "model.onnx")
    assert "evaluate int8" in log and "cache hit  evaluation of int8" not in log  # its numbers are fresh


def test_overwritten_parent_is_rebuilt_and_a_bit_identical_rebuild_keeps_its_children(base_run, runs, capsys) -> None:
    model = runs / "toy" / "onnx-fp32" / "model.onnx"
    original = sha256_file(model)
    _flip_middle(model)
    records, log = _rerun(base_run[0], runs, capsys)
    assert "onnx-fp32/model.onnx: sha256 " in log and "!= recorded " in log
    assert _rebuilt(records) == {"onnx-fp32"}  # the export is deterministic: int8 stays a cache hit
    assert sha256_file(model) == original


def test_deleted_file_and_old_manifest_are_rebuilt(base_run, runs, capsys) -> None:
    (runs / "toy" / "int8" / "model.onnx").unlink()
    manifest = runs / "toy" / "source" / "artifact.json"
    old = {k: v for k, v in json.loads(manifest.read_text()).items() if k != "files"}  # as an older version wrote it
    manifest.write_text(json.dumps(old))
    records, log = _rerun(base_run[0], runs, capsys)
    assert "int8/model.onnx: missing: rebuilding" in log
    assert "source: its manifest has no file list" in log
    assert _rebuilt(records) == {"source", "int8"}
    assert onnx.load(str(runs / "toy" / "int8" / "model.onnx")).graph.node


def test_added_file_is_not_trusted(base_run, runs, capsys) -> None:
    (runs / "toy" / "onnx-fp32" / "model.onnx.data").write_bytes(b"planted")
    records, log = _rerun(base_run[0], runs, capsys)
    assert "onnx-fp32/model.onnx.data: not one of the files recorded at commit: rebuilding" in log
    assert _rebuilt(records) == {"onnx-fp32"}
    assert not (runs / "toy" / "onnx-fp32" / "model.onnx.data").exists()


def _export_with_external_data(original):
    def run(artifact, options, ctx):
        out = original(artifact, options, ctx)
        path = ctx.outdir / out.file
        onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, location="model.onnx.data")
        return out

    return run


def test_external_data_is_verified_and_new_parent_bytes_rebuild_children(base_run, runs, capsys, monkeypatch) -> None:
    spec = registry._STAGES["export"]
    monkeypatch.setitem(registry._STAGES, "export", dataclasses.replace(spec, run=_export_with_external_data(spec.run)))
    # Same key, new bytes (as a non-deterministic stage would give): the child must follow.
    records, _ = _rerun(base_run[0], runs, capsys, "--force", "onnx-fp32")
    assert _rebuilt(records) == {"onnx-fp32", "int8"}
    assert set(records["onnx-fp32"]["artifact"]["files"]) == {"model.onnx", "model.onnx.data"}

    _flip_middle(runs / "toy" / "onnx-fp32" / "model.onnx.data")
    records, log = _rerun(base_run[0], runs, capsys)
    assert "onnx-fp32/model.onnx.data: sha256 " in log
    assert _rebuilt(records) == {"onnx-fp32"}  # rebuilt bit-identical: int8 is kept


def test_damaged_evaluation_caches_are_remeasured(base_run, runs, capsys) -> None:
    run_dir = runs / "toy"
    truth = json.loads((run_dir / "finetune" / "_evaluation.json").read_text())["metrics"]["top1"]
    os.truncate(run_dir / "int8" / "_predictions.npy", 100)  # crashed every later run before
    (run_dir / "onnx-fp32" / "_evaluation.json").write_text('{"key": ')
    altered = json.loads((run_dir / "finetune" / "_evaluation.json").read_text())
    altered["metrics"]["top1"] = 99.0  # valid JSON, key intact, numbers edited
    (run_dir / "finetune" / "_evaluation.json").write_text(json.dumps(altered))
    records, log = _rerun(base_run[0], runs, capsys)
    assert "int8/_predictions.npy: re-evaluating" in log
    for name in ("finetune", "onnx-fp32", "int8"):
        assert f"evaluate {name}" in log and f"cache hit  evaluation of {name}" not in log
    assert records["finetune"]["evaluation"]["metrics"]["top1"] == truth
    assert _rebuilt(records) == set()
    records, log = _rerun(base_run[0], runs, capsys)  # and the rewritten caches are trusted again
    assert all(f"cache hit  evaluation of {name}" in log for name in ("finetune", "onnx-fp32", "int8"))


def test_hf_folder_weights_are_verified(tmp_path, capsys) -> None:
    from llm_toys import tiny_pipeline

    data = "{window: 32, evaluation_windows: 2, calibration_windows: 2}"
    stages = "\n  - prune: {importance: l2, mlp_ratio: 0.5, round_to: 16}"
    pipeline, runs = tiny_pipeline(tmp_path, "tinyllm", stages, data=data), tmp_path / "runs"
    assert run_quietly(pipeline, runs, "--no-bench", "--no-eval")[0] == EXIT_OK
    _flip_middle(runs / "tinyllm" / "source" / "model.safetensors")
    records, log = _rerun(pipeline, runs, capsys, "--no-eval")
    assert "source/model.safetensors: sha256 " in log
    assert _rebuilt(records) == {"source"}  # saved again bit-identical: the pruned child is kept


def _fake_bench(calls: list[str]):
    def bench(cfg, art, cache_dir, machine):
        calls.append(art.name)
        latency = [
            {"batch_size": b, "iterations": 5, "p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0, "mean_ms": 1.0}
            | {"throughput": 1000.0 * b}
            for b in cfg.bench.batch_sizes
        ]
        return {"backend": "fake", "threads": 1, "latency": latency, "peak_rss_mb": 1.0, "rss_before_session_mb": 1.0}

    return bench


def test_damaged_bench_caches_are_remeasured(base_run, runs, capsys, monkeypatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(runner, "_bench_subprocess", _fake_bench(calls))
    assert run_quietly(base_run[0], runs)[0] == EXIT_OK
    assert sorted(calls) == ["finetune", "int8", "onnx-fp32"]
    run_dir = runs / "toy"
    os.truncate(run_dir / "int8" / "_bench.json", 10)
    altered = json.loads((run_dir / "onnx-fp32" / "_bench.json").read_text())
    altered["result"]["latency"][0]["p50_ms"] = 0.001
    (run_dir / "onnx-fp32" / "_bench.json").write_text(json.dumps(altered))
    calls.clear()
    code, _, records = run_quietly(base_run[0], runs)
    assert code == EXIT_OK
    assert sorted(calls) == ["int8", "onnx-fp32"]
    assert records["onnx-fp32"]["bench"]["latency"][0]["p50_ms"] == 1.0


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_leftovers_of_dead_runs_are_removed(base_run, runs, capsys) -> None:
    run_dir, dead, alive = runs / "toy", _dead_pid(), os.getppid()
    shutil.copytree(run_dir / "int8", run_dir / f".int8.old-{dead}")
    shutil.copytree(run_dir / "int8", run_dir / f".int8.old-{alive}")
    (run_dir / f".onnx-fp32.tmp-{dead}").mkdir()
    (run_dir / "int8" / f"._evaluation.json.tmp-{dead}").write_text("{")
    (run_dir / "int8" / f"._predictions.npy.tmp-{dead}").write_bytes(b"\x93NUMPY")
    records, _ = _rerun(base_run[0], runs, capsys)
    assert not list(run_dir.glob(f"*{dead}")) and not list(run_dir.glob(f"*/*{dead}"))
    assert (run_dir / f".int8.old-{alive}").is_dir()  # a live process's folder is not touched
    assert _rebuilt(records) == set()


# -- the source fingerprint ----------------------------------------------------------------------------------
def test_weights_changed_in_the_middle_rebuild_the_source(tmp_path, fashion_mnist, capsys) -> None:
    import torch

    weights = tmp_path / "weights.pth"
    # 3 MiB: the model's state dict plus padding, so the middle of the file is far from both ends.
    torch.save({"state_dict": tiny_cnn().state_dict(), "pad": torch.zeros(750_000)}, weights)
    pipeline = pipeline_yaml(
        tmp_path, fashion_mnist, name="wts", stages="\n  - export: {opset: 17, name: onnx-fp32}", gates="{}"
    )
    pipeline.write_text(pipeline.read_text().replace("  input_size: 28\n", f"  input_size: 28\n  weights: {weights}\n"))
    runs = tmp_path / "runs"
    assert run_quietly(pipeline, runs, "--no-bench", "--no-eval")[0] == EXIT_OK
    size = weights.stat().st_size
    assert size > 3 << 20
    _flip_middle(weights)  # head and tail MiB untouched: the old fingerprint did not see this
    assert weights.stat().st_size == size
    code, _, records = run_quietly(pipeline, runs, "--no-bench", "--no-eval")
    assert code == EXIT_OK
    assert _rebuilt(records) == {"source", "onnx-fp32"}  # a new source key: its children follow


def test_digests_are_cached_by_stat_and_a_changed_file_is_read_again(tmp_path, monkeypatch) -> None:
    reads: list[Path] = []
    real = sha256_file
    monkeypatch.setattr("compress.hashing.sha256_file", lambda p: reads.append(Path(p)) or real(p))
    path, cache = tmp_path / "w.bin", tmp_path / ".cache"
    path.write_bytes(b"a" * 4096)
    first = cached_sha256(path, cache)
    assert cached_sha256(path, cache) == first and len(reads) == 2  # just written: not remembered yet
    os.utime(path, ns=(10**18, 10**18))  # an old file
    cached_sha256(path, cache)
    reads.clear()
    assert cached_sha256(path, cache) == first and reads == []  # unchanged: not read again
    path.write_bytes(b"b" * 4096)  # same size, new mtime
    assert cached_sha256(path, cache) != first and reads == [path.resolve()]
