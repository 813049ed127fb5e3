"""`quantize: {precision: int8, method: smoothquant}` through the runner on a tiny random Llama: from the torch
source to a dynamic W8A8 ONNX file, beside plain dynamic W8A8 from the float export; cached on a re-run."""

from __future__ import annotations

from pathlib import Path

import pytest
from llm_toys import tiny_pipeline
from toys import run_quietly

from compress.cli import EXIT_OK

STAGES = """
  - export: {opset: 17, name: onnx-fp32}
  - quantize: {precision: int8, method: dynamic, name: dyn, input: onnx-fp32}
  - quantize: {precision: int8, method: {name: smoothquant, samples: 3}, name: sq, input: source}
  - quantize: {precision: int8, method: {name: smoothquant, alpha: 0.5}, lm_head: float, name: sq-05, input: source}
  - quantize: {precision: int8, method: {name: dynamic, activations: token}, name: dyn-token, input: onnx-fp32}
  - quantize: {precision: int8, method: {name: smoothquant, samples: 3, activations: token}, name: sq-token,
               input: source}"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sq")
    data = "{window: 32, evaluation_windows: 2, calibration_windows: 4}"
    pipeline = tiny_pipeline(tmp, "tinysq", STAGES, data=data, gates="{ppl_rise_max: 50}")
    return pipeline, tmp / "runs", run_quietly(pipeline, tmp / "runs", "--no-bench")


def test_smoothquant_artifacts(run) -> None:
    _, _, (code, _, rec) = run
    assert code == EXIT_OK
    for name, alpha, samples in (("sq", "auto", 3), ("sq-05", 0.5, 16)):
        art = rec[name]["artifact"]
        info = art["info"]
        assert (art["format"], art["precision"], info["method"]) == ("onnx", "int8", "smoothquant")
        assert info["alpha"] == alpha and info["calibration_samples"] == samples
        assert info["smoothing_max_abs_diff"] < 1e-4  # the folds are exact in float
        assert ("norm" in info["alphas_by_producer"]) == (name == "sq")  # the head is smoothed when quantized
        assert info["groups_unsmoothed"] == []  # v -> o folds under grouped-query attention too
        assert info["quantized_nodes"]["MatMulInteger"] == (14 if name == "sq-05" else 15)  # 2 x 7 Linears (+ head)
        folder = Path(art["path"])
        assert sorted(p.name for p in folder.iterdir() if p.suffix == ".onnx") == ["model.onnx"]
        assert not (folder / "_fp").exists()
        assert rec[name]["evaluation"]["metrics"]["ppl"] > 0
    # alpha 0.5 is applied to every group: 4 groups x 2 layers
    assert rec["sq-05"]["artifact"]["info"]["alphas_by_producer"] == {
        k: {"0.5": 2}
        for k in ("input_layernorm", "post_attention_layernorm", "up_proj", "v_proj")  # no head
    }
    assert rec["dyn"]["artifact"]["info"]["method"] == "dynamic"


def test_per_token_branches(run) -> None:
    """`activations: token`: recorded in the info, no DynamicQuantizeLinear left in either graph, and the
    same MatMulIntegers as the per-tensor branches."""
    import onnx

    _, _, (code, _, rec) = run
    assert code == EXIT_OK
    for name, tensor in (("dyn-token", "dyn"), ("sq-token", "sq")):
        info = rec[name]["artifact"]["info"]
        assert (
            "one scale per token" in info["activations"]
            and "per tensor" in rec[tensor]["artifact"]["info"]["activations"]
        )
        assert (
            info["quantized_nodes"]["MatMulInteger"]
            == rec[tensor]["artifact"]["info"]["quantized_nodes"]["MatMulInteger"]
        )
        ops = [n.op_type for n in onnx.load(str(Path(rec[name]["artifact"]["path"]) / "model.onnx")).graph.node]
        assert "DynamicQuantizeLinear" not in ops and ops.count("ReduceMax") > 0
        assert rec[name]["evaluation"]["metrics"]["ppl"] > 0


def test_a_rerun_is_a_cache_hit(run) -> None:
    pipeline, runs, _ = run
    code, _, rec = run_quietly(pipeline, runs, "--no-bench")
    assert code == EXIT_OK
    assert rec["sq"]["cached"] and rec["sq-05"]["cached"] and rec["sq-token"]["cached"]
