"""Structured pruning of CNNs through torch-pruning: coupling, targets, importance, save and ONNX parity."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from prune_toys import DepthwiseResidualNet, MobileNetV2, TwoConvNet, kept_rows, randomise_batchnorm, tiny_net

from compress.errors import ConfigError, StageError
from compress.prune import PruneOptions, load_module, prune_vision, save_module


def _onnx_matches(model: torch.nn.Module, x: torch.Tensor, path) -> float:
    """Export `model` and return the max |torch - onnxruntime| on `x`."""
    torch.onnx.export(
        model,
        (x,),
        str(path),
        input_names=["x"],
        output_names=["y"],
        opset_version=18,
        dynamo=True,
        external_data=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    return float(np.abs(got - want).max())


def test_depthwise_residual_grouped_net_is_pruned_consistently(tmp_path) -> None:
    net = tiny_net()
    x = torch.randn(2, 3, 16, 16)
    # round_to=1: torch-pruning 1.6.1 rounds a grouped conv's per-group count against its total width,
    # which leaves the stem/project group unpruned at round_to=8 (see compress/prune/vision.py).
    report = prune_vision(net, x, PruneOptions(target={"channels": 0.5}, importance="l2", round_to=1))
    widths = {layer.name: layer.after for layer in report.layers}
    # The residual add couples stem and project (and the grouped conv's input, 8 per group);
    # the depthwise conv follows expand; the grouped conv keeps its 2 groups.
    assert widths["stem.0"] == widths["project.0"] == net.grouped[0].in_channels == 8
    assert widths["expand.0"] == widths["depthwise.0"] == net.depthwise[0].groups == 16
    assert net.grouped[0].groups == 2 and widths["grouped.0"] == 16
    assert widths["head"] == 5, "the output layer is always kept"
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    out = net(x)
    assert out.shape == (2, 5)
    # Saved with its pruned widths: a rebuild from the constructor gives the same function (bit-exact).
    save_module(net, tmp_path / "pruned")
    again = load_module(tmp_path / "pruned", DepthwiseResidualNet).eval()
    assert torch.equal(again(x), out)
    # ONNX Runtime vs torch: 1e-4 absolute covers float32 re-association of conv sums in ORT's kernels.
    assert _onnx_matches(net, x, tmp_path / "tiny.onnx") < 1e-4


def test_mobilenet_v2_reaches_40_percent_macs_and_exports(tmp_path) -> None:
    torch.manual_seed(0)
    net = MobileNetV2(num_classes=10).eval()
    randomise_batchnorm(net)
    x = torch.randn(1, 3, 32, 32)  # MACs scale with pixels alike in every layer: the ratio holds at 224 px
    seen: list[float] = []
    report = prune_vision(
        net, x, PruneOptions(target={"macs": 0.4}, steps=10), progress=lambda _s, _n, r: seen.append(r)
    )
    assert report.macs_reduction >= 0.4
    assert seen == sorted(seen) and seen[-1] == pytest.approx(report.macs_reduction)
    assert report.steps == len(seen) < 10, "stops at the first step that meets the target"
    assert net.classifier[1].out_features == 10
    assert all(layer.after % 8 == 0 for layer in report.layers if layer.name != "classifier.1"), "round_to=8"
    assert _onnx_matches(net, torch.randn(2, 3, 32, 32), tmp_path / "mnv2.onnx") < 1e-4


def _two_conv_with_rows(rows: torch.Tensor) -> TwoConvNet:
    net = TwoConvNet().eval()
    with torch.no_grad():
        net.conv1.weight.copy_(rows.view(16, 3, 3, 3))
        net.bn.weight.fill_(1.0)
        net.bn.bias.zero_()
        net.conv2.weight.fill_(0.1)  # equal downstream columns: ranking decided by conv1's rows
    return net


def _spread_vs_spike_rows() -> torch.Tensor:
    """Channels 0-7: 27 entries of 0.5 (L1 13.5, L2 2.6); channels 8-15: one entry of 4 (L1 4, L2 4)."""
    scale = 1.0 + 0.01 * torch.arange(16.0)  # distinct rows, so each kept row identifies its channel
    rows = torch.zeros(16, 27)
    rows[:8] = 0.5
    rows[8:, 0] = 4.0
    return rows * scale[:, None]


@pytest.mark.parametrize(("importance", "expected"), [("l1", list(range(8))), ("l2", list(range(8, 16)))])
def test_magnitude_importance_keeps_largest_norms(importance: str, expected: list[int]) -> None:
    rows = _spread_vs_spike_rows()
    net = _two_conv_with_rows(rows)
    opts = PruneOptions(importance=importance, target={"channels": 0.5}, round_to=1)
    prune_vision(net, torch.randn(1, 3, 8, 8), opts)
    assert kept_rows(rows.view(16, 3, 3, 3), net.conv1.weight.data) == expected


def test_bn_scale_keeps_largest_abs_gamma() -> None:
    torch.manual_seed(0)
    net = TwoConvNet().eval()
    gamma = torch.tensor([0.1, -3.0, 0.2, 2.5, -0.05, 0.3, 4.0, 0.01, -2.0, 0.02, 1.5, 0.03, -1.2, 0.04, 1.1, 0.0])
    original = net.conv1.weight.data.clone()
    with torch.no_grad():
        net.bn.weight.copy_(gamma)
    prune_vision(
        net,
        torch.randn(1, 3, 8, 8),
        PruneOptions(importance="bn_scale", target={"channels": 0.5}, round_to=1),
    )
    expected = sorted(torch.argsort(gamma.abs(), descending=True)[:8].tolist())
    assert kept_rows(original, net.conv1.weight.data) == expected
    assert sorted(net.bn.weight.data.abs().tolist()) == sorted(gamma.abs()[expected].tolist())


def test_taylor_uses_gradients_not_magnitude() -> None:
    # Channels 0-7 have the largest conv1 weights but feed nothing (their conv2 columns are zero), so
    # |w * dL/dw| is zero for them: Taylor removes them, while L2 magnitude keeps them.
    torch.manual_seed(0)
    rows = torch.randn(16, 27) * 0.1
    rows[:8] *= 30.0
    net = _two_conv_with_rows(rows)
    with torch.no_grad():
        net.conv2.weight.normal_()
        net.conv2.weight[:, :8] = 0.0
    magnitude = copy.deepcopy(net)
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))) for _ in range(3)]
    prune_vision(
        net,
        torch.randn(1, 3, 8, 8),
        PruneOptions(importance="taylor", target={"channels": 0.5}, round_to=1),
        calib_batches=batches,
    )
    prune_vision(
        magnitude,
        torch.randn(1, 3, 8, 8),
        PruneOptions(importance="l2", target={"channels": 0.5}, round_to=1),
    )
    assert kept_rows(rows.view(16, 3, 3, 3), net.conv1.weight.data) == list(range(8, 16))
    assert kept_rows(rows.view(16, 3, 3, 3), magnitude.conv1.weight.data) == list(range(8))
    assert all(p.grad is None for p in net.parameters()), "gradients used for ranking are cleared"


def test_taylor_without_calibration_is_refused() -> None:
    with pytest.raises(ValueError, match="taylor"):
        prune_vision(TwoConvNet(), torch.randn(1, 3, 8, 8), PruneOptions(importance="taylor"))


def test_wanda_is_rejected_for_vision() -> None:
    with pytest.raises(ValueError, match="allowed: l1, l2, bn_scale, taylor"):
        prune_vision(TwoConvNet(), torch.randn(1, 3, 8, 8), PruneOptions(importance="wanda"))


def test_ignored_layers_are_kept_and_unknown_globs_fail() -> None:
    net = tiny_net()
    x = torch.randn(1, 3, 16, 16)
    report = prune_vision(net, x, PruneOptions(target={"channels": 0.5}, ignored_layers=("grouped.*",)))
    assert {layer.name: layer.after for layer in report.layers}["grouped.0"] == 32
    with pytest.raises(StageError, match="'nothing.*' matches no module"):
        prune_vision(tiny_net(), x, PruneOptions(ignored_layers=("nothing.*",)))


def test_unreachable_macs_target_raises() -> None:
    net = tiny_net()
    opts = PruneOptions(target={"macs": 0.95}, steps=2, max_layer_ratio=0.5)
    with pytest.raises(StageError, match="MACs target 0.950 not reached"):
        prune_vision(net, torch.randn(1, 3, 16, 16), opts)


def test_target_needs_exactly_one_of_channels_or_macs() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        PruneOptions(target={"channels": 0.3, "macs": 0.3})
    with pytest.raises(ValueError, match="extra"):
        PruneOptions(ratio=0.5)
