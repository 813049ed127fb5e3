"""`quantize: {precision: int4}` through the runner: a tiny random Llama (RTN and GPTQ, both targets), a vision
TinyCNN (Linear head only), a refused combination, and a bit-exact GPTQ checkpoint import."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from llm_toys import tiny_llama, tiny_pipeline
from onnx import numpy_helper
from toys import pipeline_yaml, run_quietly

from compress.artifact import read_artifact
from compress.cli import EXIT_OK, main
from compress.config import load_pipeline
from compress.errors import ConfigError
from compress.families.causal_lm.sessions import TorchCausalLM
from compress.progress import Reporter
from compress.quant.algorithms.checkpoint import read_gptq_checkpoint, write_gptq_checkpoint
from compress.quant.algorithms.gptq import GPTQConfig, gptq_quantize_model
from compress.quant.algorithms.rtn import rtn_quantize_model
from compress.quant.primitives.packing import pack_matmul_nbits
from compress.quant.primitives.weight import WeightQuantConfig
from compress.runner import make_adapter

# hidden 64, 2 layers: q/o 64x64, k/v 32x64, gate/up 128x64, down 64x128 per layer
LINEAR_PARAMS = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)
STAGES = """
  - export: {opset: 17, name: onnx-fp32}
  - quantize: {precision: int4, method: rtn, group_size: 32, name: rtn, input: source}
  - quantize: {precision: int4, method: {name: gptq, samples: 2}, group_size: 32, name: gptq, input: source}
  - quantize: {precision: int4, method: rtn, group_size: 32, symmetric: true, target: tensorrt, name: rtn-trt,
               input: source}
  - quantize: {precision: int4, method: {name: gptq, samples: 2}, group_size: 32, symmetric: true, target: tensorrt,
               name: gptq-trt, input: source}"""


def _llm_pipeline(tmp: Path, stages: str, name: str = "tiny4") -> Path:
    data = """{window: 64, evaluation_windows: 4, calibration_windows: 4, generation_tokens: 8,
       prompts: ["The for statement", "def"]}"""
    return tiny_pipeline(tmp, name, stages, data=data, gates="{ppl_rise_max: 50}")


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int4")
    pipeline = _llm_pipeline(tmp, STAGES)
    code, _, records = run_quietly(pipeline, tmp / "runs", "--no-bench")
    return code, records, pipeline, tmp


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_artifacts_are_int4_and_smaller(llm_run) -> None:
    code, rec, _, _ = llm_run
    assert code == EXIT_OK
    fp32 = rec["onnx-fp32"]["size_bytes"]
    # Each Linear weight goes from 4 bytes to 0.5 (codes) + 4/32 (fp32 scale) [+ 0.5/32 (zero point, asym)];
    # the tied float embedding (1000 x 64), norms and graph stay: predict the size within 5 %.
    for name, zp in (("rtn", 0.5), ("gptq", 0.5), ("rtn-trt", 0.0), ("gptq-trt", 0.0)):
        art = rec[name]["artifact"]
        assert art["precision"] == "int4" and art["info"]["layers_quantized"] == 14
        expected = fp32 - LINEAR_PARAMS * (4 - 0.5 - (4 + zp) / 32)
        assert rec[name]["size_bytes"] == pytest.approx(expected, rel=0.05), name
        assert rec[name]["size_bytes"] < 0.66 * fp32
        path = Path(art["path"]) / "model.onnx"
        assert not (Path(art["path"]) / "_fp.onnx").exists()
        if art["target"] == "tensorrt":
            assert "MatMulNBits" not in _ops(path) and "DequantizeLinear" in _ops(path)
            assert art["info"]["tensorrt_rules"] == "passed" and art["info"]["opset"] == 21
            assert art["info"]["ort_session_config"] == {"session.qdq_matmulnbits_accuracy_level": "0"}
        else:
            assert "MatMulNBits" in _ops(path)


@pytest.fixture(scope="module")
def dequantized(llm_run):
    """Torch models with the same INT4 weights as the stage's (its algorithms are deterministic), by method."""
    _, _, pipeline, tmp = llm_run
    adapter = make_adapter(load_pipeline(pipeline), Reporter(quiet=True), tmp / "runs" / ".cache")
    models = {}
    for method, symmetric in (("rtn", False), ("gptq", False), ("rtn", True), ("gptq", True)):
        model = tiny_llama(tie=True)  # the weights saved as the pipeline source
        if method == "rtn":
            rtn_quantize_model(model, config=WeightQuantConfig(group_size=32, symmetric=symmetric))
        else:
            batches = [{k: torch.from_numpy(v) for k, v in b.items()} for b in adapter.calibration_inputs(2, 1)]
            gptq_quantize_model(model, batches, config=GPTQConfig(group_size=32, symmetric=symmetric))
        models[method, symmetric] = model
    return adapter, models


@pytest.mark.parametrize(
    ("name", "method", "symmetric"),
    [("rtn", "rtn", False), ("gptq", "gptq", False), ("rtn-trt", "rtn", True), ("gptq-trt", "gptq", True)],
)
def test_onnx_matches_dequantized_torch(llm_run, dequantized, name, method, symmetric) -> None:
    _, rec, _, _ = llm_run
    adapter, models = dequantized
    model = models[method, symmetric]
    ref = adapter.evaluate(TorchCausalLM(model, threads=1), Reporter(quiet=True), method).metrics["ppl"]
    # a random 1000-word model is near uniform, so perplexity moves little: 0.1 % covers int8 activations
    assert rec[name]["evaluation"]["metrics"]["ppl"] == pytest.approx(ref, rel=1e-3)
    # logits: the tensorrt artifact is evaluated at accuracy level 0 (what TensorRT computes: float
    # activations), i.e. the dequantized model up to float reassociation (1e-4); MatMulNBits at accuracy
    # level 4 quantizes activations to int8 per block and differs by ~1e-3
    art = rec[name]["artifact"]
    session = adapter.open_session(read_artifact(Path(art["path"])), threads=1)
    window = adapter.windows["evaluation"][:1]
    diff = float(np.abs(session.logits(window) - TorchCausalLM(model, threads=1).logits(window)).max())
    if art["target"] == "tensorrt":
        assert diff < 1e-4
    else:
        assert 1e-4 < diff < 0.05


def test_tensorrt_with_asymmetric_weights_is_a_config_error(tmp_path) -> None:
    bad = _llm_pipeline(
        tmp_path, "\n  - quantize: {precision: int4, method: rtn, target: tensorrt, name: bad}", name="bad"
    )
    with pytest.raises(ConfigError) as err:
        load_pipeline(bad)
    assert re.search(
        r"bad\.yaml:\d+: stages\[0\]\.quantize\.symmetric = False: target tensorrt needs symmetric", str(err.value)
    )


def test_vision_int4_quantizes_linear_head_only(tmp_path, fashion_mnist) -> None:
    stages = """
  - quantize: {precision: int4, method: {name: gptq, samples: 16}, group_size: 32, name: int4}
  - quantize: {precision: int4, method: rtn, group_size: 32, symmetric: true, target: tensorrt, name: int4-trt,
               input: source}"""
    path = pipeline_yaml(tmp_path, fashion_mnist, name="cnn4", stages=stages, gates="{}")
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"]) == EXIT_OK
    for name in ("int4", "int4-trt"):
        info = json.loads((tmp_path / "runs" / "cnn4" / name / "artifact.json").read_text())["info"]
        assert info["layers_quantized"] == 1  # the classifier; TinyCNN has 4 convolutions, left as they are
        assert info["convolutions_untouched"] == 4
        ops = _ops(tmp_path / "runs" / "cnn4" / name / "model.onnx")
        assert "Conv" in ops and ("MatMulNBits" in ops if name == "int4" else "DequantizeLinear" in ops)
        assert info["parity_max_abs_diff"] < 0.05  # logits of an untrained 10-class head, O(1)


def test_gptq_checkpoint_import_is_bit_exact(tmp_path) -> None:
    """Our GPTQ writes an AutoGPTQ-format folder; `method: checkpoint` exports exactly its codes/scales/zeros."""
    model = tiny_llama(tie=True)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 1000, (1, 32), generator=g) for _ in range(2)]
    qws = gptq_quantize_model(model, batches, config=GPTQConfig(group_size=32, symmetric=False))
    folder = write_gptq_checkpoint(tmp_path / "gptq", qws, other_tensors={"model.norm.weight": model.model.norm.weight})
    stages = f"\n  - quantize: {{precision: int4, method: {{name: checkpoint, folder: {folder}}}, name: imported}}"
    pipeline = _llm_pipeline(tmp_path, stages, name="ckpt")
    assert main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"]) == EXIT_OK
    graph = onnx.load(str(tmp_path / "runs" / "ckpt" / "imported" / "model.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes = {n.name: n for n in graph.node if n.op_type == "MatMulNBits"}
    read, _ = read_gptq_checkpoint(folder)
    assert len(nodes) == len(qws) == 14
    for name, qw in qws.items():
        node = nodes[next(n for n in nodes if n.startswith(name.replace(".", "_") + "_MatMulNBits"))]
        want = pack_matmul_nbits(read[name])
        np.testing.assert_array_equal(inits[node.input[1]], want.B)  # packed codes
        np.testing.assert_array_equal(inits[node.input[2]], want.scales)
        np.testing.assert_array_equal(inits[node.input[3]], want.zero_points)
        # and those are our GPTQ's codes and zero points; scales as stored (float16) in the folder
        assert torch.equal(read[name].qweight, qw.qweight) and torch.equal(read[name].zeros, qw.zeros)
        assert torch.equal(read[name].scales, qw.scales.half().float())
