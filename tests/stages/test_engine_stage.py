"""The `engine` stage on a machine without TensorRT or a GPU: CPU checks first, then a skip (optional) or a
fast failure (required) with the install hint; profiles from the vision adapter's io_spec; and, where a GPU
and TensorRT exist, a real engine run through the tensorrt backend."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from toys import pipeline_yaml

from compress.cli import EXIT_INCOMPLETE, EXIT_OK, EXIT_STAGE, main
from compress.config import load_pipeline
from compress.errors import ConfigError, StageError
from compress.families.base import IOSpec
from compress.gpu import availability
from compress.gpu.availability import gpu_status
from compress.progress import Reporter
from compress.runner import Runner, make_adapter
from compress.stages.engine import EngineOptions, adapter_defaults, default_dim_ranges, resolve_profile

TRT = gpu_status("tensorrt")
HINT = "pip install 'compress[tensorrt]'"

# No finetune: the toy's new head is untrained, so nothing is evaluated or benchmarked and a run is seconds.
TRT_STAGES = """
  - export: {{opset: 17, parity_samples: 8, name: onnx-fp32}}
  - quantize: {{precision: int8, target: tensorrt, method: {{name: static, samples: 32}}, name: int8-trt}}
  - engine: {{precision: int8, optional: {optional}}}{after}"""
# A stage after the engine: it must not run when a required engine fails.
AFTER = "\n  - quantize: {precision: int8, method: {name: static, samples: 32}, name: late, input: onnx-fp32}"


def _pipeline(tmp: Path, fashion: Path, *, optional: bool, gates: str = "{}", after: str = "") -> Path:
    stages = TRT_STAGES.format(optional=str(optional).lower(), after=after)
    return pipeline_yaml(tmp, fashion, name="trt", stages=stages, gates=gates)


def _run(pipeline: Path, runs: Path, *extra: str) -> int:
    return main(["run", str(pipeline), "--runs-dir", str(runs), "--quiet", "--no-bench", *extra])


@pytest.fixture(scope="module")
def optional_run(tmp_path_factory, fashion_mnist):
    """One optional-engine run; later tests reuse its cached export and quantize artifacts."""
    tmp = tmp_path_factory.mktemp("engine")
    pipeline = _pipeline(tmp, fashion_mnist, optional=True)
    code = _run(pipeline, tmp / "runs")
    return tmp, code


@pytest.mark.skipif(TRT.available, reason="this machine has TensorRT and a GPU: the engine is built, not skipped")
def test_optional_engine_is_skipped_with_the_install_hint(optional_run) -> None:
    tmp, code = optional_run
    run_dir = tmp / "runs" / "trt"
    assert code == EXIT_OK
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [(s["stage"], s["artifact"]) for s in manifest["skipped"]] == [("engine", "engine")]
    assert HINT in manifest["skipped"][0]["reason"]
    assert "engine" not in {r["artifact"]["name"] for r in manifest["artifacts"]}
    assert (run_dir / "int8-trt" / "artifact.json").is_file() and not (run_dir / "engine").exists()
    assert not list(run_dir.glob(".*tmp*"))  # the stage's temporary folder is removed
    report = (run_dir / "report.md").read_text()
    skipped = report.split("## Skipped", 1)[1]
    assert "`engine` (engine)" in skipped and HINT in skipped


@pytest.mark.skipif(TRT.available, reason="this machine has TensorRT and a GPU: the engine is built, not skipped")
def test_gates_naming_a_skipped_engine_say_so(optional_run, fashion_mnist) -> None:
    tmp, _ = optional_run
    gates = (
        "speedup_min: {artifact: engine, vs: int8-trt, at_least: 1.0}\n"
        "  size_ratio_max: {artifact: engine, vs: int8-trt, at_most: 2.0}"
    )
    pipeline = _pipeline(tmp, fashion_mnist, optional=True, gates=gates)
    # a gate on an artifact that does not exist cannot be checked: the run is incomplete (exit 4), not a pass
    assert _run(pipeline, tmp / "runs") == EXIT_INCOMPLETE
    manifest = json.loads((tmp / "runs" / "trt" / "manifest.json").read_text())
    assert manifest["verdict"] == "INCOMPLETE" and manifest["passed"] is False
    by_gate = {g["gate"]: g for g in manifest["gates"]}
    for gate in ("speedup_min", "size_ratio_max"):
        assert by_gate[gate]["status"] == "not-checked" and by_gate[gate]["value"] is None
        assert "'engine' was skipped" in by_gate[gate]["detail"] and HINT in by_gate[gate]["detail"]


@pytest.mark.skipif(TRT.available, reason="this machine has TensorRT and a GPU: the engine is built")
def test_required_engine_fails_with_the_hint_and_nothing_after_it_runs(
    optional_run, fashion_mnist, monkeypatch, capsys
) -> None:
    tmp, _ = optional_run
    run_dir = tmp / "runs" / "trt"
    after_walk = []
    monkeypatch.setattr(Runner, "_evaluate_all", lambda self: after_walk.append("evaluate"))
    monkeypatch.setattr(Runner, "_bench_all", lambda self: after_walk.append("bench"))
    pipeline = _pipeline(tmp, fashion_mnist, optional=False, after=AFTER)
    assert main(["run", str(pipeline), "--runs-dir", str(tmp / "runs"), "--quiet"]) == EXIT_STAGE
    err = capsys.readouterr().err
    assert "stage engine (engine)" in err and HINT in err
    # the stage after the engine, evaluation, benchmarks and the gates never happen; no verdict is left behind
    assert not (run_dir / "late").exists() and after_walk == []
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["verdict"] is None and manifest["gates"] == [] and manifest["run"]["state"] == "failed"
    assert "run failed — no verdict" in (run_dir / "report.md").read_text()
    assert not (run_dir / "engine").exists() and not list(run_dir.glob(".*tmp*"))


def test_missing_gpu_is_a_skip_too(optional_run, fashion_mnist, monkeypatch) -> None:
    """With the package present but no GPU (GpuUnavailableError), optional skips and required fails (exit 3)."""
    if gpu_status("gpu").available:
        pytest.skip("this machine has an NVIDIA GPU")
    tmp, _ = optional_run
    monkeypatch.setattr(availability, "import_tensorrt", lambda purpose: types.SimpleNamespace(__version__="10.0"))
    pipeline = _pipeline(tmp, fashion_mnist, optional=True)
    assert _run(pipeline, tmp / "runs", "--no-eval") == EXIT_OK
    manifest = json.loads((tmp / "runs" / "trt" / "manifest.json").read_text())
    assert "needs an NVIDIA GPU" in manifest["skipped"][0]["reason"]
    assert _run(_pipeline(tmp, fashion_mnist, optional=False), tmp / "runs", "--no-eval") == EXIT_STAGE


def test_rule_breaking_graph_fails_on_cpu_naming_the_node(tmp_path, fashion_mnist, capsys) -> None:
    """An onnxruntime-cpu INT8 graph (uint8 activations with zero points, INT32 bias DQ) breaks TensorRT's
    rules: the engine stage fails even when optional and with no tensorrt installed, naming a node."""
    stages = """
  - export: {opset: 17, parity_samples: 8, name: onnx-fp32}
  - quantize: {precision: int8, target: onnxruntime-cpu, method: {name: static, samples: 32}, name: int8}
  - engine: {precision: int8, optional: true}"""
    pipeline = pipeline_yaml(tmp_path, fashion_mnist, name="cpuq", stages=stages, gates="{}")
    assert _run(pipeline, tmp_path / "runs", "--no-eval") == EXIT_STAGE
    err = capsys.readouterr().err
    assert "not ready for TensorRT" in err and HINT not in err
    model = onnx.load(str(tmp_path / "runs" / "cpuq" / "int8" / "model.onnx"))
    names = {n.name for n in model.graph.node if n.name}
    named = [line for line in err.splitlines() if "node '" in line]
    assert named and all(line.split("node '", 1)[1].split("'", 1)[0] in names for line in named)


def test_float_graph_refused_for_int8_on_cpu(optional_run, fashion_mnist, capsys) -> None:
    tmp, _ = optional_run
    stages = """
  - export: {opset: 17, parity_samples: 8, name: onnx-fp32}
  - engine: {precision: int8, optional: true}"""
    pipeline = pipeline_yaml(tmp, fashion_mnist, name="trt", stages=stages, gates="{}")
    assert _run(pipeline, tmp / "runs", "--no-eval") == EXIT_STAGE
    assert "has no Q/DQ nodes" in capsys.readouterr().err


# -- profiles ----------------------------------------------------------------------------------------


def test_default_profile_from_the_vision_adapter(optional_run, fashion_mnist) -> None:
    tmp, _ = optional_run
    cfg = load_pipeline(_pipeline(tmp, fashion_mnist, optional=True))
    adapter = make_adapter(cfg, Reporter(quiet=True), tmp / "runs" / ".cache")
    assert adapter.io_spec().inputs == {"input": ("batch", 3, 28, 28)}
    # batch: opt 8 (default bench), max = the evaluation batch size (64 by default) as it exceeds 32
    assert adapter_defaults(adapter) == {"batch": (1, 8, 64)}
    model = onnx.load(str(tmp / "runs" / "trt" / "int8-trt" / "model.onnx"), load_external_data=False)
    (r,) = resolve_profile(model, adapter.io_spec(), {}, adapter_defaults(adapter)).inputs
    assert (r.name, r.min, r.opt, r.max) == ("input", (1, 3, 28, 28), (8, 3, 28, 28), (64, 3, 28, 28))
    # a pipeline's range replaces the default; it holds even when the exporter renamed the dimension
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "s0"
    (r,) = resolve_profile(model, adapter.io_spec(), {"batch": (2, 4, 16)}, adapter_defaults(adapter)).inputs
    assert (r.min[0], r.opt[0], r.max[0]) == (2, 4, 16)


def test_profile_errors_and_causal_lm_defaults() -> None:
    from gpu.conftest import conv_model, decoder_inputs_model  # tiny ONNX files of the GPU-layer tests

    vision = IOSpec(inputs={"x": ("batch", 3, 8, 8)}, outputs={}, dtypes={"x": "float32"})
    static = conv_model(batch=2)
    with pytest.raises(StageError, match="static in the ONNX file"):
        resolve_profile(static, vision, {"batch": (1, 2, 4)}, {})
    assert resolve_profile(static, vision, {}, default_dim_ranges(vision)).inputs[0].max == (2, 3, 8, 8)
    assert default_dim_ranges(vision, max_batch=4) == {"batch": (1, 8, 32)}

    lm = IOSpec(
        inputs={"input_ids": ("batch", "sequence"), "attention_mask": ("batch", "sequence")}, outputs={}, dtypes={}
    )
    ranges = default_dim_ranges(lm, max_batch=1, max_sequence=512)
    assert ranges == {"batch": (1, 8, 32), "sequence": (1, 128, 512)}
    p = resolve_profile(decoder_inputs_model(), lm, {}, ranges).as_dict()
    assert p["attention_mask"].opt == (8, 128) and p["input_ids"].max == (32, 512)
    # a dimension with no default and no range is named
    with pytest.raises(ConfigError, match="sequence"):
        resolve_profile(decoder_inputs_model(), lm, {}, default_dim_ranges(lm))


def test_options_validate_before_any_work() -> None:
    assert EngineOptions(precision="fp16").output_format("onnx") == "engine"
    with pytest.raises(ValueError, match="min <= opt <= max"):
        EngineOptions(precision="int8", profiles={"batch": (8, 4, 16)})
    with pytest.raises(ValueError):
        EngineOptions(precision="int2")
    with pytest.raises(ValueError):
        EngineOptions(precision="int8", backend="openvino")
    # the timing cache path speeds a build up but does not change the engine: not in the cache key
    a = EngineOptions(precision="int8", timing_cache="/tmp/a.cache").cache_fields()
    assert a == EngineOptions(precision="int8").cache_fields() and "timing_cache" not in a


# -- on a GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not TRT.available, reason=f"TensorRT engine test: {TRT.reason}")
def test_int8_engine_runs_through_the_backend(tmp_path, fashion_mnist) -> None:
    """Build the toy's INT8 engine and compare it with ONNX Runtime CPU on the same Q/DQ graph: both compute
    INT8 convolutions with the same scales, so top-1 agrees on >= 90% of 32 images (rounding at a Q node
    can flip a near tie) and logits differ by at most 10% of their range (a few quantization steps)."""
    from compress.artifact import read_artifact
    from compress.backends import open_session

    pipeline = _pipeline(tmp_path, fashion_mnist, optional=False)
    assert _run(pipeline, tmp_path / "runs", "--no-eval") == EXIT_OK
    run_dir = tmp_path / "runs" / "trt"
    engine, onnx_art = read_artifact(run_dir / "engine"), read_artifact(run_dir / "int8-trt")
    assert engine.format == "engine" and engine.info["tensorrt_version"] and engine.info["build_seconds"] >= 0
    assert engine.info["compute_capability"] != "unknown"
    cfg = load_pipeline(pipeline)
    adapter = make_adapter(cfg, Reporter(quiet=True), tmp_path / "runs" / ".cache")
    inputs = next(adapter.calibration_inputs(32, batch_size=32))
    trt_session = open_session(engine, adapter, threads=1)
    assert trt_session.backend == "tensorrt"
    got = trt_session.run(inputs)[0].astype(np.float32)
    ref = open_session(onnx_art, adapter, threads=1).run(inputs)[0]
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert np.abs(got - ref).max() <= 0.1 * (ref.max() - ref.min())


@pytest.mark.skipif(gpu_status("onnxruntime-gpu").available, reason="onnxruntime-gpu and a GPU are present")
def test_cuda_provider_fails_before_any_work(tmp_path, fashion_mnist, capsys) -> None:
    """`bench.onnx_providers: [cuda]` without onnxruntime-gpu: the run stops with the hint, nothing loaded."""
    pipeline = pipeline_yaml(tmp_path, fashion_mnist, name="cuda", stages="\n  - export: {opset: 17}", gates="{}")
    pipeline.write_text(pipeline.read_text().replace("threads: 1}", "threads: 1, onnx_providers: [cuda]}"))
    assert _run(pipeline, tmp_path / "runs") == EXIT_STAGE
    assert "pip install 'compress[gpu]'" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "cuda" / "source").exists()  # not even the source model was loaded
