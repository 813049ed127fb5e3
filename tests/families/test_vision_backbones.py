"""Built-in vision backbones, timm/torchvision state dicts, `hf:` classifiers, ViT INT8 and honest MACs.

`reference_keys.json` holds the state-dict key names and shapes of torchvision 0.29.1's and timm 1.0.31's
own models (written once from those packages; neither imports beside the CPU torch of this venv), so the
definitions here are checked against the real formats, not against themselves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from toys import pipeline_yaml, run_quietly

from compress.cli import main
from compress.errors import StageError
from compress.families.vision.model_io import load_weights, replace_head
from compress.families.vision.models import BUILTINS
from compress.families.vision.options import VisionModelOptions
from compress.prune import PruneOptions, load_module, prune_vision, save_module
from compress.prune.vision import count_macs

REFERENCE = json.loads((Path(__file__).parent / "reference_keys.json").read_text())
TORCHVISION, TIMM = REFERENCE["torchvision 0.29.1"], REFERENCE["timm 1.0.31"]
# Parameters of torchvision's models at 224 px (its docs' "num_params"); ViT-S/Ti: timm's (same layers).
PARAMS = {
    "mobilenet_v2": 3_504_872,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "vit_b_16": 86_567_656,
    "vit_s_16": 22_050_664,
    "vit_ti_16": 5_717_416,
    "efficientnet_b0": 5_288_548,
    "convnext_tiny": 28_589_128,
}
HEADS = {
    "mobilenet_v2": "classifier.1",
    "resnet18": "fc",
    "resnet50": "fc",
    "vit_b_16": "heads.head",
    "vit_s_16": "heads.head",
    "vit_ti_16": "heads.head",
    "efficientnet_b0": "classifier.1",
    "convnext_tiny": "classifier.2",
}


def _on_meta(name: str, image_size: int = 224) -> nn.Module:
    """The definition without memory or init time: shapes and names only."""
    with torch.device("meta"):
        return BUILTINS[name].build(image_size)


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {key: list(value.shape) for key, value in state.items()}


def _meta_state(keys: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in keys.items()}


def _options(name: str, weights: str = "w.pth") -> VisionModelOptions:
    return VisionModelOptions(source=f"builtin:{name}", weights=weights)


def test_registry_lists_every_definition_and_each_matches_the_published_size() -> None:
    assert set(BUILTINS) == set(PARAMS) == set(HEADS)
    for name in BUILTINS:
        assert sum(p.numel() for p in _on_meta(name).parameters()) == PARAMS[name], name


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_names_and_shapes_are_torchvisions(name: str) -> None:
    model = _on_meta(name)
    reference = TORCHVISION[name]
    if (rename := BUILTINS[name].from_torchvision) is not None:  # ViT: in_proj_weight/bias are the qkv Linear
        reference = rename(reference)
        assert reference != TORCHVISION[name]
    assert _shapes(model.state_dict()) == reference
    load_weights(model, _meta_state(TORCHVISION[name]), _options(name))  # strict: every key used


@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_state_dicts_load_after_renaming(name: str) -> None:
    model = _on_meta(name)
    load_weights(model, _meta_state(TIMM[name]["keys"]), _options(name))  # told by its keys; strict


def test_a_state_dict_of_neither_format_names_missing_and_unexpected_keys() -> None:
    keys = dict(TIMM["convnext_tiny"]["keys"])
    keys.pop("head.fc.weight")
    keys["head.extra.weight"] = [3]
    with pytest.raises(ValueError) as err:
        load_weights(_on_meta("convnext_tiny"), _meta_state(keys), _options("convnext_tiny"))
    text = str(err.value)
    assert "as timm: missing ['classifier.2.weight']" in text and "unexpected ['head.extra.weight']" in text
    assert "tried torchvision (" in text and "model.weights = w.pth" in text


def test_timm_tensors_land_where_their_names_say() -> None:
    """timm's qkv is our qkv Linear; ConvNeXt's gamma (C,) becomes layer_scale (C, 1, 1)."""
    torch.manual_seed(0)
    vit = {k: torch.randn(s) for k, s in TIMM["vit_ti_16"]["keys"].items()}
    model = BUILTINS["vit_ti_16"].build(224)
    load_weights(model, vit, _options("vit_ti_16"))
    block = model.encoder.layers.encoder_layer_3
    assert torch.equal(block.self_attention.qkv.weight, vit["blocks.3.attn.qkv.weight"])
    assert torch.equal(block.mlp[3].weight, vit["blocks.3.mlp.fc2.weight"])
    assert torch.equal(model.encoder.pos_embedding, vit["pos_embed"])
    gamma = torch.randn(384)
    keys = {k: torch.zeros(s) for k, s in TIMM["convnext_tiny"]["keys"].items()} | {"stages.2.blocks.4.gamma": gamma}
    convnext = BUILTINS["convnext_tiny"].build(224)
    load_weights(convnext, keys, _options("convnext_tiny"))
    assert torch.equal(convnext.features[5][4].layer_scale.flatten(), gamma)


def test_a_224_px_vit_checkpoint_loads_at_32_px() -> None:
    """The 14x14 position grid is resized to 2x2 (plus the class token, kept as is)."""
    state = BUILTINS["vit_ti_16"].build(224).state_dict()
    small = BUILTINS["vit_ti_16"].build(32)
    load_weights(small, state, _options("vit_ti_16"))
    assert small.encoder.pos_embedding.shape == (1, 5, 192)
    assert torch.equal(small.encoder.pos_embedding[:, 0], state["encoder.pos_embedding"][:, 0])


@pytest.mark.parametrize("name", sorted(HEADS))
def test_num_classes_replaces_the_classifier(name: str) -> None:
    with torch.device("meta"):
        model = BUILTINS[name].build(224)
        assert replace_head(model, 7) is True
        assert replace_head(model, 7) is False, "a head of the right size is kept"
    assert model.get_submodule(HEADS[name]).out_features == 7


def onnx_parity(model: nn.Module, size: int, path: Path) -> float:
    """max |torch - ONNX Runtime| / max(1, |logits|) on random images, BatchNorm statistics made non-trivial."""
    import onnxruntime as ort

    torch.manual_seed(0)
    for module in model.modules():  # so that a mis-exported BatchNorm would show
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 1.5)
            module.running_mean.normal_(0, 0.1)
    x = torch.randn(2, 3, size, size)
    torch.onnx.export(model.eval(), (x,), str(path), input_names=["input"], opset_version=17, dynamo=False)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def test_resnet18_exports_to_onnx_with_parity(tmp_path: Path) -> None:
    # 1e-4: float32 re-association of long conv sums in ORT's kernels (EfficientNet, ConvNeXt: slow file).
    assert onnx_parity(BUILTINS["resnet18"].build(32), 32, tmp_path / "m.onnx") <= 1e-4


# -- ViT through the pipeline: timm weights at 224 px into a 32 px model, export, INT8 for both targets ---
VIT_STAGES = """
  - export: {opset: 17, name: onnx-fp32}
  - quantize: {precision: int8, method: {name: static, samples: 16}, name: int8}
  - quantize: {precision: int8, target: tensorrt, method: {name: static, samples: 16},
      name: int8-trt, input: onnx-fp32}"""


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, fashion_mnist: Path) -> tuple[int, dict, Path]:
    tmp = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    timm_state = {k: torch.randn(s) * 0.02 for k, s in TIMM["vit_ti_16"]["keys"].items()}
    save_file(timm_state, str(tmp / "vit_tiny_patch16_224.safetensors"))
    path = pipeline_yaml(
        tmp, fashion_mnist, name="vit", source="builtin:vit_ti_16", stages=VIT_STAGES, gates="top1_drop_max: 100"
    )
    text = path.read_text().replace("input_size: 28", "input_size: 32").replace("samples: 300", "samples: 32")
    # timm's 1000-class head kept (no num_classes): the model is evaluated as it is, so the gate is checked
    path.write_text(text.replace("num_classes: 10", f"weights: {tmp / 'vit_tiny_patch16_224.safetensors'}"))
    code, _, records = run_quietly(path, tmp / "runs", "--no-bench")
    return code, records, tmp / "runs" / "vit"


def _producers(graph: onnx.GraphProto) -> dict[str, str]:
    return {out: node.op_type for node in graph.node for out in node.output}


@pytest.mark.parametrize("artifact", ["int8", "int8-trt"])
def test_vit_int8_keeps_layernorm_softmax_gelu_and_adds_float(vit_run, artifact: str) -> None:
    code, records, run = vit_run
    assert code == 0, "timm weights loaded (keys renamed, positions resized), every stage ran, the gate held"
    assert records["onnx-fp32"]["artifact"]["info"]["parity_max_abs_diff"] < 1e-4
    graph = onnx.load(str(run / artifact / "model.onnx")).graph
    made_by = _producers(graph)
    fed_by_dq = {n.op_type for n in graph.node if any(made_by.get(i) == "DequantizeLinear" for i in n.input)}
    assert {"MatMul", "Conv"} <= fed_by_dq <= {"MatMul", "Conv", "Gemm"}, "Q/DQ on MatMul, Gemm and Conv only"
    float_ops = {n.op_type for n in graph.node} & {"LayerNormalization", "Softmax", "Erf", "Add"}
    assert float_ops == {"LayerNormalization", "Softmax", "Erf", "Add"}
    info = records[artifact]["artifact"]["info"]
    assert info["quantized_op_types"] == ["Conv", "Gemm", "MatMul"]
    assert info["float_op_types"]["LayerNormalization"] == 25 and info["float_op_types"]["Softmax"] == 12
    assert info["float_op_types"]["Erf"] == 12  # one GELU per block
    assert f"`{artifact}` is INT8 on Conv/Gemm/MatMul only" in (run / "report.md").read_text()


# -- hf: image classifiers from a folder -------------------------------------------------------------
HF_STAGES = """
  - finetune: {steps: 2, lr: 1.0e-3, batch_size: 16}
  - export: {opset: 17, name: onnx-fp32}
  - quantize: {precision: int8, method: {name: static, samples: 16}, name: int8}"""


def _hf_folder(kind: str, folder: Path) -> Path:
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    if kind == "vit":
        config = ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=5,
        )
        ViTForImageClassification(config).save_pretrained(folder)
    else:
        config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5)
        ResNetForImageClassification(config).save_pretrained(folder)
    return folder


def _hf_pipeline(tmp: Path, fashion: Path, source: str, name: str = "hf") -> Path:
    path = pipeline_yaml(tmp, fashion, name=name, source=source, stages=HF_STAGES, gates="top1_drop_max: 100")
    path.write_text(path.read_text().replace("input_size: 28", "input_size: 32").replace("samples: 300", "samples: 32"))
    return path


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_hf_image_classifier_from_a_folder_runs_the_pipeline(kind: str, tmp_path: Path, fashion_mnist: Path) -> None:
    folder = _hf_folder(kind, tmp_path / kind)
    code, _, records = run_quietly(
        _hf_pipeline(tmp_path, fashion_mnist, f"hf:{folder}"), tmp_path / "runs", "--no-bench"
    )
    assert code == 0
    assert records["onnx-fp32"]["artifact"]["info"]["parity_max_abs_diff"] < 1e-4
    graph = onnx.load(str(tmp_path / "runs" / "hf" / "onnx-fp32" / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    assert graph.output[0].type.tensor_type.shape.dim[1].dim_value == 10, "5 labels replaced by the task's 10"
    assert records["int8"]["evaluation"]["metrics"]["samples"] == 32


def test_hf_folder_problems_are_config_errors_before_work(tmp_path: Path, fashion_mnist: Path, capsys) -> None:
    missing = _hf_pipeline(tmp_path, fashion_mnist, f"hf:{tmp_path / 'nowhere' / 'x y'}", name="missing")
    assert main(["validate", str(missing)]) == 2
    assert "not a hub id" in capsys.readouterr().err.replace("\n", " ")
    folder = _hf_folder("resnet", tmp_path / "remote")
    config = json.loads((folder / "config.json").read_text()) | {"auto_map": {"AutoModel": "x.Net"}}
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["validate", str(_hf_pipeline(tmp_path, fashion_mnist, f"hf:{folder}", name="remote"))]) == 2
    assert "ships code to run" in capsys.readouterr().err.replace("\n", " ")


# -- MACs: a count that sees Conv2d subclasses ---------------------------------------------------------
class Conv2dSame(nn.Conv2d):
    """TensorFlow's "same" padding computed from the input size, as timm's `Conv2dSame` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return nn.functional.conv2d(nn.functional.pad(x, pads), self.weight, self.bias, self.stride, 0, 1, self.groups)


class SamePaddingNet(nn.Module):
    """A plain stem and head around two "same"-padded convs that hold 98% of the MACs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32)
        self.c2, self.b2 = Conv2dSame(32, 64, 3, bias=False), nn.BatchNorm2d(64)
        self.c3, self.b3 = Conv2dSame(64, 64, 3, bias=False), nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))  # (B, 32, 16, 16) at 32 px
        x = torch.relu(self.b3(self.c3(torch.relu(self.b2(self.c2(x))))))
        return self.fc(x.mean(dim=(2, 3)))


def _same_net_macs(net: SamePaddingNet) -> int:
    """By hand at 32 px: every conv outputs 16x16."""
    convs = net.c1.out_channels * 3 * 9 + net.c2.out_channels * net.c2.in_channels * 9
    return 256 * (convs + net.c3.out_channels * net.c3.in_channels * 9) + net.fc.in_features * 10


def test_count_macs_sees_conv_subclasses() -> None:
    torch.manual_seed(0)
    net = SamePaddingNet().eval()
    assert count_macs(net, torch.randn(2, 3, 32, 32)) == _same_net_macs(net) == 14_377_600


def test_a_macs_target_torch_pruning_cannot_measure_is_refused() -> None:
    """On main this model reported -65.3% for a -60% target while it lost 86.9% of its MACs."""
    torch.manual_seed(0)
    net = SamePaddingNet().eval()
    with pytest.raises(StageError) as err:
        prune_vision(net, torch.randn(1, 3, 32, 32), PruneOptions(target={"macs": 0.6}, steps=10, round_to=1))
    assert "MACs counts disagree: 14,377,600 MACs in every Conv/Linear instance" in str(err.value)
    assert "skips the Conv/Linear subclasses Conv2dSame" in str(err.value)
    net = SamePaddingNet().eval()
    report = prune_vision(net, torch.randn(1, 3, 32, 32), PruneOptions(target={"channels": 0.5}, round_to=1))
    assert report.macs_after == _same_net_macs(net), "a channels target reports the count that sees every conv"


def _resnet18_macs(model: nn.Module) -> int:
    """By hand at 32 px: conv1 outputs 16x16, layer1 8x8, then each stage halves; fc one position."""
    side = {"conv1": 16, "layer1": 8, "layer2": 4, "layer3": 2, "layer4": 1}
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            total += (
                m.out_channels * m.in_channels // m.groups * math.prod(m.kernel_size) * side[name.split(".")[0]] ** 2
            )
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
    return total


def test_resnet18_reaches_its_macs_target_by_a_hand_count() -> None:
    torch.manual_seed(0)
    model = BUILTINS["resnet18"].build(32).eval()
    before = _resnet18_macs(model)
    report = prune_vision(model, torch.randn(1, 3, 32, 32), PruneOptions(target={"macs": 0.5}, steps=5))
    assert report.macs_before == before and report.macs_after == _resnet18_macs(model)
    assert 0.5 <= 1 - _resnet18_macs(model) / before < 0.7


def test_convnext_prunes_and_round_trips_with_its_layer_scale(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BUILTINS["convnext_tiny"].build(32).eval()
    x = torch.randn(1, 3, 32, 32)
    report = prune_vision(model, x, PruneOptions(target={"macs": 0.4}, steps=2))
    assert report.macs_reduction >= 0.4 and report.macs_after == count_macs(model, x)
    assert model.features[1][0].layer_scale.shape[0] == model.features[1][0].block[0].out_channels < 96
    save_module(model, tmp_path)
    again = load_module(tmp_path, lambda: BUILTINS["convnext_tiny"].build(32)).eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
