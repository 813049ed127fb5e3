"""Full-size built-ins (224 px, random weights): ResNet-50 and ViT-B/16 through export and static INT8,
EfficientNet-B0 and ConvNeXt-T export parity. Minutes and > 1 GB: `pytest -m slow`."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from test_vision_backbones import onnx_parity
from toys import pipeline_yaml, run_quietly

from compress.families.vision.models import BUILTINS

pytestmark = pytest.mark.slow

STAGES = """
  - export: {opset: 17, name: onnx-fp32}
  - quantize: {precision: int8, method: {name: static, samples: 8}, name: int8}"""


@pytest.mark.parametrize("name", ["efficientnet_b0", "convnext_tiny"])
def test_cnn_exports_to_onnx_with_parity(name: str, tmp_path: Path) -> None:
    assert onnx_parity(BUILTINS[name].build(64), 64, tmp_path / "m.onnx") <= 1e-4


@pytest.mark.parametrize("name", ["resnet50", "vit_b_16"])
def test_full_size_builtin_exports_and_quantizes(name: str, tmp_path: Path, fashion_mnist: Path) -> None:
    path = pipeline_yaml(
        tmp_path, fashion_mnist, name=name, source=f"builtin:{name}", stages=STAGES, gates="top1_drop_max: 100"
    )
    text = path.read_text().replace("input_size: 28", "input_size: 224").replace("  num_classes: 10\n", "")
    path.write_text(text.replace("samples: 300", "samples: 16"))  # the 1000-class head kept: evaluated as is
    code, _, records = run_quietly(path, tmp_path / "runs", "--no-bench")
    assert code == 0
    assert records["onnx-fp32"]["artifact"]["info"]["parity_max_abs_diff"] < 1e-3
    graph = onnx.load(str(tmp_path / "runs" / name / "int8" / "model.onnx")).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    kept = records["int8"]["artifact"]["info"].get("float_op_types", {})
    assert (kept.get("LayerNormalization") == 25) == (name == "vit_b_16"), "only the ViT keeps norms float"
