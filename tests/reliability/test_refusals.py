"""Quantize stages refuse what they cannot do instead of labelling a no-op "int8" (issue 10).

Before: weight-only INT8 of a CNN (MatMul weights only; a CNN has Conv and a Gemm head) wrote the float graph
back as an "int8" artifact, and an INT8 quantize of an INT4 artifact was accepted and labelled int8.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from toys import pipeline_yaml

from compress.artifact import Artifact
from compress.cli import EXIT_CONFIG, EXIT_STAGE, main
from compress.errors import StageError
from compress.stages.quantize.int8 import Int8Options, quantize_int8


@pytest.fixture(scope="module")
def weight_only_run(tmp_path_factory, fashion_mnist):
    """export -> static INT8 (works) -> weight-only INT8 of the same CNN (must fail)."""
    tmp = tmp_path_factory.mktemp("refusals")
    pipeline = pipeline_yaml(
        tmp,
        fashion_mnist,
        name="wo",
        stages="""
  - export: {opset: 17, name: onnx-fp32, parity_samples: 4}
  - quantize: {precision: int8, method: {name: static, samples: 16}, name: int8}
  - quantize: {precision: int8, method: weight-only, name: int8-wo, input: onnx-fp32}""",
    )
    err = io.StringIO()  # capsys is function-scoped; the run is shared by the tests below
    with contextlib.redirect_stderr(err):
        code = main(["run", str(pipeline), "--runs-dir", str(tmp / "runs"), "--quiet", "--no-bench"])
    return code, err.getvalue(), tmp / "runs" / "wo"


def test_weight_only_int8_of_a_cnn_fails_with_the_reason(weight_only_run) -> None:
    code, err, run = weight_only_run
    assert code == EXIT_STAGE
    assert "quantize int8 (weight-only): no node was quantized (the model has 4 Conv, 1 Gemm, 0 MatMul nodes)" in err
    assert "use method: static" in err
    assert not (run / "int8-wo").exists()  # nothing was committed under the int8 label


def test_quantized_node_count_is_recorded(weight_only_run) -> None:
    _, _, run = weight_only_run
    nodes = json.loads((run / "int8" / "artifact.json").read_text())["info"]["quantized_nodes"]
    assert nodes["QuantizeLinear"] > 0 and nodes["DequantizeLinear"] > nodes["QuantizeLinear"]  # + weight DQs


@pytest.mark.parametrize(
    ("stages", "named"),
    [
        (  # implicit input: the int4 artifact made just before
            """
  - quantize: {precision: int4, method: rtn, group_size: 32, name: int4}
  - quantize: {precision: int8, method: {name: static, samples: 16}, name: int8}""",
            "int4",
        ),
        (  # explicit input: an int8 artifact
            """
  - export: {opset: 17, name: onnx-fp32}
  - quantize: {precision: int8, method: {name: static, samples: 16}, name: int8}
  - quantize: {precision: int8, method: dynamic, name: twice, input: int8}""",
            "int8",
        ),
    ],
)
def test_int8_of_a_quantized_artifact_is_refused_before_any_work(
    tmp_path: Path, fashion_mnist: Path, capsys, stages: str, named: str
) -> None:
    pipeline = pipeline_yaml(tmp_path, fashion_mnist, name="twice", stages=stages)
    assert main(["validate", str(pipeline)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"quantize.input = '{named}': '{named}' is already {named}; quantize int8 starts from a float" in err
    assert main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == EXIT_CONFIG
    assert not (tmp_path / "runs").exists()


def test_stage_start_refuses_a_quantized_artifact(tmp_path: Path) -> None:
    """The run-time twin of the validate check (an artifact whose precision the plan could not know)."""
    art = Artifact(
        name="int4", path=tmp_path, file="model.onnx", format="onnx", precision="int4", stage="quantize",
        parent="source", key="0" * 64,
    )  # fmt: skip
    ctx = SimpleNamespace(adapter=None, outdir=tmp_path)
    with pytest.raises(StageError, match="'int4' is already int4; quantize int8 starts from a float"):
        quantize_int8(art, Int8Options(precision="int8", method="static"), ctx)
    assert list(tmp_path.iterdir()) == []
