"""Tiny models for tests, one per graph shape, each built in a fraction of a second."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Conv-BN-ReLU, a depthwise conv with a residual Add, global pooling and a Linear head."""

    def __init__(self, num_classes: int = 1000) -> None:  # an "ImageNet" head, replaced for the task
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.dw = nn.Sequential(
            nn.Conv2d(32, 32, 3, 1, 1, groups=32, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 1, bias=False),
            nn.BatchNorm2d(32),
        )
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.dw(x))
        return self.classifier(x.mean(dim=(2, 3)))  # (B, 32) -> (B, classes)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN()


class NoisyCNN(TinyCNN):
    """Adds fresh noise in forward: torch and ONNX Runtime draw different noise, so export parity must fail."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + torch.randn(out.shape)


def noisy_cnn() -> nn.Module:
    torch.manual_seed(0)
    return NoisyCNN()


class FragileCNN(nn.Module):
    """Two convs that read an activation with a huge outlier channel (channel 0 of `spike1` / `spike2` has a
    bias of 1000, which their own weights scale back): per-tensor INT8 of that activation rounds its other
    channels to zero. Left in float, `fragile1` / `fragile2` read it unquantized: the nodes a fallback must
    find; with one of them float the other still ruins the output (two independent bottlenecks). Untrained:
    training would move the outlier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.spike1, self.fragile1 = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 3, 1, 1)
        self.spike2, self.fragile2 = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 3, 1, 1)
        self.bn1, self.bn2 = nn.BatchNorm2d(16), nn.BatchNorm2d(16)
        for conv in (self.stem[0], self.spike1, self.fragile1, self.spike2, self.fragile2):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")  # untrained, the signal keeps its scale
        with torch.no_grad():
            for spike, fragile in ((self.spike1, self.fragile1), (self.spike2, self.fragile2)):
                spike.bias[0] = 1e3
                fragile.weight[:, 0] *= 1e-3
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.bn1(self.fragile1(torch.relu(self.spike1(x)))))
        x = torch.relu(self.bn2(self.fragile2(torch.relu(self.spike2(x)))))
        return self.classifier(x.mean(dim=(2, 3)))  # (B, 16) -> (B, classes)


def fragile_cnn() -> nn.Module:
    torch.manual_seed(0)
    return FragileCNN()


def pipeline_yaml(
    tmp: Path,
    fashion: Path,
    *,
    name: str = "toy",
    source: str = "python:toys:tiny_cnn",
    stages: str | None = None,
    gates: str = "top1_drop_max: 5.0",
    extra: str = "",
    calibration: int = 64,
) -> Path:
    """A small pipeline on real Fashion-MNIST slices at 28 px: trains and evaluates in seconds."""
    stages = (
        stages
        or """
  - finetune: {steps: 40, lr: 1.0e-2, batch_size: 32}
  - export: {opset: 17, name: onnx-fp32}
  - quantize: {precision: int8, method: {name: static, calibrator: minmax, samples: 64}, name: int8}
  - quantize: {precision: int8, target: tensorrt, method: {name: static, samples: 64},
      name: int8-trt, input: onnx-fp32}"""
    )
    text = f"""name: {name}
model:
  family: vision
  source: {source}
  num_classes: 10
  input_size: 28
data:
  dataset: {Path(__file__).resolve().parents[1] / "calibration" / "fashion-mnist.yaml"}
  root: {fashion}
  train: {{split: train, samples: 960}}
  calibration: {{split: train, samples: {calibration}}}
  evaluation: {{split: test, samples: 300}}
stages:{stages}
gates:
  {gates}
bench: {{batch_sizes: [1, 4], warmup: 2, iterations: 5, threads: 1}}
{extra}"""
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


def run_quietly(pipeline: Path, runs_dir: Path, *flags: str) -> tuple[int, dict, dict[str, dict]]:
    """`compress run PIPELINE --runs-dir RUNS --quiet FLAGS`: exit code, manifest, records by artifact name."""
    import json

    import yaml

    from compress.cli import main

    code = main(["run", str(pipeline), "--runs-dir", str(runs_dir), "--quiet", *flags])
    name = yaml.safe_load(pipeline.read_text())["name"]
    manifest = json.loads((runs_dir / name / "manifest.json").read_text())
    return code, manifest, {r["artifact"]["name"]: r for r in manifest["artifacts"]}


def load_script(name: str):
    """`scripts/<name>.py` imported as module `name` (scripts are not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def export_image_model(model: nn.Module, path: Path, size: int = 28) -> Path:
    """TorchScript export at opset 17 with input `input` (dynamic batch) and output `logits`, eval mode."""
    torch.onnx.export(
        model.eval(),
        torch.zeros(1, 3, size, size),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path
