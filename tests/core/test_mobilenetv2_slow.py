"""The shipped default pipeline on the real MobileNetV2 ImageNet weights, with a smaller budget (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from compress.cli import EXIT_OK, main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_default_pipeline_real_mobilenetv2(tmp_path: Path, fashion_mnist: Path) -> None:
    spec = yaml.safe_load((REPO / "pipelines" / "mobilenetv2-fashion-int8.yaml").read_text())
    spec["data"].update(
        dataset=str(REPO / spec["data"]["dataset"]),
        root=str(fashion_mnist),
        train={"split": "train", "samples": 2560},
        calibration={"split": "train", "samples": 128},
        evaluation={"split": "test", "samples": 1000},
    )
    spec["stages"][0]["finetune"].update(epochs=1)
    for stage in spec["stages"]:
        if "quantize" in stage:
            stage["quantize"]["method"]["samples"] = 128
    spec["bench"].update(iterations=30, warmup=5)
    # 40 steps of fine-tuning leave a model less robust to INT8 than the shipped one (0.41 points on 10k
    # images); on these 1000 images (one is 0.1 point) CI measured drops of 1.6 points, so the gate is 3.0.
    spec["gates"] = {"top1_drop_max": 3.0, "metric_gates_on": ["int8"]}
    pipeline = tmp_path / "mnv2.yaml"
    pipeline.write_text(yaml.safe_dump(spec))
    assert main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == EXIT_OK
    manifest = json.loads((tmp_path / "runs" / spec["name"] / "manifest.json").read_text())
    rec = {r["artifact"]["name"]: r for r in manifest["artifacts"]}
    # ImageNet features transfer: 40 steps of fine-tuning already classify Fashion-MNIST well above chance
    assert rec["finetune"]["evaluation"]["metrics"]["top1"] > 70.0
    assert rec["int8"]["evaluation"]["vs_baseline"]["agreement"] > 92.0
    assert rec["int8-trt"]["artifact"]["info"]["tensorrt_rules"] == "passed"
    assert [s["artifact"] for s in manifest["skipped"]] == ["engine-int8"]  # no TensorRT here: optional, skipped
    # INT8 weights: the file is well under half of the FP32 one
    assert rec["int8"]["size_bytes"] < 0.4 * rec["onnx-fp32"]["size_bytes"]
