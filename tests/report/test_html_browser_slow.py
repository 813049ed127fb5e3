"""report.html in a real browser: headless Chromium (Debian `chromium`) renders it and takes a screenshot."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from toys import pipeline_yaml, run_quietly

pytestmark = pytest.mark.slow


def test_report_html_renders_in_headless_chromium(tmp_path: Path, fashion_mnist: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    from PIL import Image

    stages = """
  - finetune: {steps: 40, lr: 1.0e-2, batch_size: 32}
  - export: {opset: 17, name: onnx-fp32}
  - quantize: {precision: int8, method: {name: static, calibrator: minmax, samples: 64}, name: int8}"""
    code, _, _ = run_quietly(pipeline_yaml(tmp_path, fashion_mnist, stages=stages), tmp_path / "runs")
    assert code == 0
    shot = tmp_path / "report.png"
    page = (tmp_path / "runs" / "toy" / "report.html").resolve().as_uri()
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,6000"]
    subprocess.run([browser, *args, f"--screenshot={shot}", page], check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (6000, 1280)
    drawn = (pixels < 250).mean(axis=1) > 0.01  # rows holding text, tables or pictures
    assert drawn[:2000].mean() > 0.3 and drawn[2000:4000].mean() > 0.3  # the images loaded: no blank page
