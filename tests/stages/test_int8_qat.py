"""`qat:` of static INT8 (compress/quant/qat.py, compress/stages/quantize/int8_qat.py) on tiny nets built here.

The fake-quant arithmetic is checked against ONNX Runtime's Q/DQ of one layer; the stage runs on a small
stand-in adapter (random images labelled by the float net's own top-1, so the float net scores 100 and any
drop is what quantization cost) against plain static INT8 of the same net; the refusals on the options.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from toys import export_image_model

from compress.progress import Reporter
from compress.quant.qat import QatScheme, prepare
from compress.stages.base import StageContext
from compress.stages.quantize.int8 import Int8Options, quantize_int8


def _export(model: nn.Module, path: Path) -> Path:
    return export_image_model(model, path, size=16)


def _initializer(graph: onnx.GraphProto, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name == name)


class _Images:
    """Calibration inputs from a fixed array (what `quantize_static`'s CalibrationDataReader takes)."""

    def __init__(self, images: np.ndarray, batch: int = 8) -> None:
        self.batches = iter([{"input": images[i : i + batch]} for i in range(0, len(images), batch)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def test_fake_quant_of_a_conv_equals_onnxruntime_qdq(tmp_path: Path) -> None:
    """Conv + BatchNorm, BN folded, per-channel int8 weights and uint8 input: the scales and zero points equal
    ORT's from the same min/max, and the output equals ORT's Q/DQ graph's (the Conv's output left float there,
    so no output rounding hides a difference) to 1e-5 of its range; the float conv is far off it."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    with torch.no_grad():  # a BN with statistics of its own, so folding changes the weights
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.2, 0.2)
    images = np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32)
    src = _export(model, tmp_path / "float.onnx")
    qdq = tmp_path / "qdq.onnx"
    quantize_static(
        str(src),
        str(qdq),
        _Images(images),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={
            "WeightSymmetric": True,
            "ActivationSymmetric": False,
            "OpTypesToExcludeOutputQuantization": ["Conv"],
        },
    )
    graph = onnx.load(str(qdq)).graph
    by_op = {n.op_type: n for n in graph.node if n.op_type == "QuantizeLinear"}
    q_input = by_op["QuantizeLinear"]
    conv = next(n for n in graph.node if n.op_type == "Conv")
    w_dq = next(n for n in graph.node if n.output[0] == conv.input[1])

    prepared = prepare(copy.deepcopy(model), QatScheme(per_channel=True))
    assert prepared.folded == 1 and len(prepared.weights) == 1 and len(prepared.activations) == 1
    prepared.set_mode("observe")
    prepared.module(torch.from_numpy(images))
    prepared.set_mode("frozen")
    scale, zero = prepared.activations[0].quant_params()
    assert scale == pytest.approx(float(_initializer(graph, q_input.input[1])), rel=1e-6)
    assert zero == int(_initializer(graph, q_input.input[2]))
    fused = prepared.module.get_submodule(prepared.weights[0])
    ours = fused.parametrizations.weight[0].scales(fused.weight).numpy()
    np.testing.assert_allclose(ours, _initializer(graph, w_dq.input[1]), rtol=1e-6)

    with torch.no_grad():
        simulated = prepared.module(torch.from_numpy(images)).numpy()
        floating = model.eval()(torch.from_numpy(images)).numpy()
    reference = ort.InferenceSession(str(qdq), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]
    span = float(np.abs(reference).max())
    assert np.abs(simulated - reference).max() <= 1e-5 * span
    assert np.abs(floating - reference).max() > 1e-3 * span  # what the test tells apart: rounding is visible


# -- the stage on a fragile net ---------------------------------------------------------------------------
TRAIN, CALIB, TEST = 512, 64, 448  # disjoint slices of one array of images
OUTLIER = 1000.0  # channel 0 of `spike` scaled up (its reader scaled down): the float function is unchanged


class _FragileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.spike = nn.Conv2d(16, 16, 1)
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.classifier = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.spike(self.stem(x)))
        return self.classifier(self.body(x).mean(dim=(2, 3)))


def _task() -> tuple[nn.Module, np.ndarray, np.ndarray]:
    """A net trained (150 Adam steps) to name the nearest of 10 colour directions of each image, then made
    fragile: one activation channel 1000x the others, so per-tensor uint8 rounds the rest to a few levels."""
    rng = np.random.default_rng(0)
    n = TRAIN + CALIB + TEST
    images = (rng.standard_normal((n, 3, 1, 1)) + 0.5 * rng.standard_normal((n, 3, 16, 16))).astype(np.float32)
    labels = (images.mean(axis=(2, 3)) @ rng.standard_normal((3, 10)).astype(np.float32)).argmax(1)
    torch.manual_seed(0)
    net = _FragileNet().train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.from_numpy(images[:TRAIN]), torch.from_numpy(labels[:TRAIN])
    for step in range(150):
        pick = torch.from_numpy(np.random.default_rng(step).permutation(TRAIN)[:64])
        loss = nn.functional.cross_entropy(net(x[pick]), y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        net.eval().spike.weight[0] *= OUTLIER
        net.spike.bias[0] *= OUTLIER
        net.body[0].weight[:, 0] /= OUTLIER
    return net, images, labels


class _Adapter:
    """What the QAT path asks of a family: the torch model, train batches, calibration inputs, the export."""

    default_int8_method = "static"
    calibration_batch_size = 8

    def __init__(self, net: nn.Module, images: np.ndarray, labels: np.ndarray) -> None:
        self.net, self.images, self.labels = net, images, labels

    def load_torch(self, artifact) -> nn.Module:
        return copy.deepcopy(self.net)

    def io_spec(self):
        return SimpleNamespace(inputs={"input": None})

    def calibration_inputs(self, samples: int | None = None, batch_size: int = 1):
        part = self.images[TRAIN : TRAIN + CALIB][:samples]
        for start in range(0, len(part), batch_size):
            yield {"input": part[start : start + batch_size]}

    def batches(self, role: str, batch_size: int, *, seed: int | None = None):
        assert role == "train"
        order = np.random.default_rng(seed).permutation(TRAIN)
        for start in range(0, TRAIN, batch_size):
            pick = order[start : start + batch_size]
            yield self.images[pick], self.labels[pick]

    def export_onnx(self, model: nn.Module, path: Path, *, opset: int, dynamo: bool) -> None:
        _export(model, path)


def _quantize(adapter: _Adapter, tmp: Path, model: Path | None, **keys) -> tuple[Path, dict]:
    """Static INT8 (minmax, the 64 calibration images) of the ONNX file `model`, or with `qat` of the torch net."""
    tmp.mkdir()
    options = Int8Options(precision="int8", method={"name": "static", "calibrator": "minmax", "samples": CALIB}, **keys)
    artifact = SimpleNamespace(name="float", precision="fp32", main=model or tmp / "model.safetensors")
    ctx = StageContext(adapter, tmp, {}, None, Reporter(quiet=True), 1, 0, "test")
    out = quantize_int8(artifact, options, ctx)
    assert not (tmp / "_qat").exists() and not (tmp / "_pre").exists()
    return tmp / out.file, out.info


def _scores(path: Path, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(top-1 %, cross-entropy) of the graph at `path` on the test slice."""
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]
    loss = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    return 100.0 * float((logits.argmax(1) == labels).mean()), loss


def _layout(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """Each compute node in graph order with the op types feeding it: the Q/DQ layout, names aside."""
    graph = onnx.load(str(path)).graph
    producer = {out: n.op_type for n in graph.node for out in n.output}
    return [
        (n.op_type, tuple(producer.get(i, "-") for i in n.input))
        for n in graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
    ]


def test_qat_beats_the_same_training_without_fake_quant_and_keeps_the_qdq_layout(tmp_path: Path) -> None:
    net, images, labels = _task()
    adapter = _Adapter(net, images, labels)
    test_x, test_y = images[-TEST:], labels[-TEST:]
    steps, lr = 40, 1e-3
    plain, _ = _quantize(adapter, tmp_path / "ptq", _export(net, tmp_path / "float.onnx"))
    qat, info = _quantize(adapter, tmp_path / "qat", None, qat={"steps": steps, "lr": lr, "batch_size": 32})
    # control: the same batches, optimizer and schedule without fake-quant, then the same static INT8
    from compress.stages.finetune import _lr_factor

    control = copy.deepcopy(net)
    opt = torch.optim.AdamW(control.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, int(0.05 * steps), steps))
    done, epoch = 0, 0
    while done < steps:
        for x, y in adapter.batches("train", 32, seed=epoch):
            loss = nn.functional.cross_entropy(control(torch.from_numpy(x)), torch.from_numpy(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                break
        epoch += 1
    trained, _ = _quantize(adapter, tmp_path / "control", _export(control.eval(), tmp_path / "control.onnx"))

    (float_top1, _), (ptq_top1, ptq_loss) = (
        _scores(tmp_path / "float.onnx", test_x, test_y),
        _scores(plain, test_x, test_y),
    )
    (control_top1, control_loss), (qat_top1, qat_loss) = _scores(trained, test_x, test_y), _scores(qat, test_x, test_y)
    assert float_top1 > 90 and ptq_top1 < 50  # the outlier is what costs: the float net knows the task
    # measured: top-1 35 (PTQ), 46 (control), 58 (QAT); loss 2.45, 2.23, 1.70
    assert qat_top1 >= control_top1 + 5 and qat_loss <= 0.85 * control_loss and qat_loss < ptq_loss
    recorded = info["qat"]
    assert recorded["steps"] == steps and recorded["batchnorms_folded"] == 2 and recorded["fake_quant_weights"] == 4
    assert recorded["loss_end"] < recorded["loss_start"]
    assert _layout(qat) == _layout(plain)


def _problems(family: str = "vision", **keys) -> list[tuple[str, str]]:
    from compress.registry import registered_adapters

    method = keys.pop("method", {"name": "static", "samples": 512})
    options = Int8Options(precision="int8", method=method, qat={"steps": 3}, **keys)
    return options.check_family(registered_adapters()[family])


def test_qat_refusals_name_the_key_and_what_to_do() -> None:
    assert _problems() == []
    ((key, why),) = _problems(method="dynamic")
    assert key == "qat" and "applies to method static only (method is dynamic)" in why
    ((key, why),) = _problems("text-encoder", method="static")
    assert key == "qat" and "family text-encoder has no training data or task loss" in why
    keys = {"sensitivity": {"samples": 64}, "accuracy_budget": {"max_drop": 0.2, "samples": 64, "start": 1024}}
    problems = dict(_problems(**keys))
    assert set(problems) == {"sensitivity", "accuracy_budget"}
    assert "does not compose with qat yet" in problems["accuracy_budget"]
    ((key, why),) = _problems(method={"name": "static", "exclude_nodes": ["/conv/Conv"]})
    assert key == "qat" and "method.exclude_nodes names ONNX nodes" in why


def test_qat_starts_from_torch_and_trains_on_data_train() -> None:
    options = Int8Options(precision="int8", method="static", qat={}, input="onnx-fp32")
    assert options.accepts == frozenset({"torch"}) and options.needs_train_data
    ((key, why),) = options.check_plan({"finetune": "torch", "onnx-fp32": "onnx"})
    assert key == "input" and "'onnx-fp32' is ONNX; set input: to a torch artifact (finetune)" in why
    plain = Int8Options(precision="int8", method="static")
    assert plain.accepts == frozenset({"onnx"}) and not plain.needs_train_data


def test_the_cache_key_holds_every_qat_option_and_is_unchanged_without_it() -> None:
    plain = Int8Options(precision="int8", method="static").cache_fields()
    assert "qat" not in plain and "qat_version" not in plain
    base = Int8Options(precision="int8", method="static", qat={}).cache_fields()
    assert base["qat"] == {"steps": 300, "lr": 1e-5, "batch_size": 32, "weight_decay": 0.0, "warmup": 0.05}
    assert base["qat_version"] >= 1
    for change in ({"steps": 200}, {"lr": 3e-5}, {"batch_size": 16}, {"weight_decay": 0.01}, {"warmup": 0.1}):
        assert Int8Options(precision="int8", method="static", qat=change).cache_fields() != base
