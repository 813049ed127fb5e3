"""A run prints our lines only (issue 10): no library chatter, user text verbatim, running values labelled.

Before: ONNX Runtime's calibrator printed its histogram notes, the exporter its constant-folding warnings,
transformers its FutureWarnings; rich markup ate `[tensorrt]` from `pip install 'compress[tensorrt]'`;
"(a GGUF is converted once and cached)" was printed for a folder source; "ppl 42.934" read as final.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from toys import TinyCNN, pipeline_yaml

from compress.config import load_pipeline
from compress.progress import Reporter
from compress.runner import make_adapter

HERE = Path(__file__).parent
REPO = HERE.parents[1]
NOISE = (
    "Collecting tensor data",  # ONNX Runtime's calibrator (entropy, percentile)
    "Finding optimal threshold",
    "Number of histogram bins",
    "Constant folding",  # torch's TorchScript exporter
    "Please consider to run pre-processing",  # ONNX Runtime's quantize_dynamic
    "Warning",  # FutureWarning, UserWarning, DeprecationWarning, TracerWarning
    "WARNING",
    "Traceback",
)


class StridedCNN(TinyCNN):
    """A strided slice of a constant in forward: the TorchScript exporter warns "Constant folding - Only steps=1"."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("gain", torch.ones(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.gain[::2].view(1, 3, 1, 1))


def strided_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return StridedCNN()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), str(HERE)])}
    return subprocess.run(
        [sys.executable, "-m", "compress.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_a_vision_run_prints_only_our_lines(tmp_path: Path, fashion_mnist: Path) -> None:
    pipeline = pipeline_yaml(
        tmp_path,
        fashion_mnist,
        name="console",
        source="python:test_console:strided_cnn",
        stages="""
  - finetune: {steps: 5, lr: 1.0e-2, batch_size: 32}
  - export: {opset: 17, name: onnx-fp32, parity_samples: 4}
  - quantize: {precision: int8, method: {name: static, calibrator: percentile, samples: 16}, name: int8}
  - quantize: {precision: int8, target: tensorrt, method: {name: static, calibrator: entropy, samples: 16},
      name: int8-trt, input: onnx-fp32}
  - quantize: {precision: int8, method: dynamic, name: int8-dyn, input: onnx-fp32}
  - engine: {backend: tensorrt, precision: int8, input: int8-trt, optional: true}""",
        gates="top1_drop_max: 100",
    )
    proc = _cli("run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--no-bench")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert [n for n in NOISE if n in out] == [], out
    if "tensorrt' is not installed" in out:  # the skip line keeps the extra's brackets
        assert "pip install 'compress[tensorrt]'" in out


def test_a_causal_lm_run_prints_only_our_lines(tmp_path: Path) -> None:
    from llm_toys import tiny_llama, tiny_tokenizer

    folder = tmp_path / "model"
    tiny_llama(tie=True).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    pipeline = tmp_path / "llm.yaml"
    pipeline.write_text(f"""name: tinyllm
model: {{family: causal-lm, source: "hf:{folder}"}}
data: {{window: 32, evaluation_windows: 2, calibration_windows: 2, generation_tokens: 4, prompts: ["def"]}}
stages:
  - export: {{opset: 17, name: onnx-fp32, parity_samples: 2}}
  - quantize: {{precision: int8, method: dynamic, name: int8}}
gates: {{ppl_rise_max: 100.0}}
""")
    proc = _cli("run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--no-bench")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert [n for n in NOISE if n in out] == [], out
    assert f"loading hf:{folder}\n" in out  # no GGUF note for a folder


def test_user_text_is_printed_as_written() -> None:
    buffer = io.StringIO()
    reporter = Reporter(console=Console(file=buffer, width=200, highlight=False))
    reporter.log("[yellow]skip[/] engine: pip install 'compress[tensorrt]' (layers[0], [/tmp/x])")
    assert buffer.getvalue() == "skip engine: pip install 'compress[tensorrt]' (layers[0], [/tmp/x])\n"


class _Recorder(Reporter):
    """Keeps every progress `info=` a task gets."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.infos: list[str] = []

    @contextmanager
    def task(self, description: str, total: float | None):
        recorder = self

        class _Task:
            def advance(self, n: float = 1, info: str | None = None) -> None:
                recorder.infos.append(info or "")

        yield _Task()


class _Uniform:
    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.zeros((len(inputs["input"]), 10), np.float32)]


def test_running_values_are_labelled_running(tmp_path: Path, fashion_mnist: Path) -> None:
    cfg = load_pipeline(pipeline_yaml(tmp_path, fashion_mnist))
    reporter = _Recorder()
    make_adapter(cfg, reporter, tmp_path / "cache").evaluate(_Uniform(), reporter, "x")
    assert reporter.infos and all(i.startswith("running top1 ") for i in reporter.infos)


@pytest.mark.parametrize("text", ["[tensorrt]", "a[b]c", "[/path]"])
def test_bracketed_text_survives_task_lines(text: str) -> None:
    buffer = io.StringIO()
    reporter = Reporter(quiet=True, console=Console(file=buffer, width=200, highlight=False))
    with reporter.task(f"evaluate {text}", total=1):
        pass
    assert buffer.getvalue() == f"  evaluate {text} ...\n"
