"""report.html in a real browser: headless Chromium (Debian `chromium`) renders it and takes a screenshot."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from toys import pipeline_yaml, run_quietly

pytestmark = pytest.mark.slow


def _screenshot(page: Path, shot: Path, height: int) -> np.ndarray:
    """Grey levels (height, 1280) of `page` as headless Chromium draws it."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    from PIL import Image

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size=1280,{height}"]
    uri = page.resolve().as_uri()
    subprocess.run([browser, *args, f"--screenshot={shot}", uri], check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(shot).convert("L"), dtype=np.float32)


def test_report_html_renders_in_headless_chromium(tmp_path: Path, fashion_mnist: Path) -> None:
    stages = """
  - finetune: {steps: 40, lr: 1.0e-2, batch_size: 32}
  - export: {opset: 17, name: onnx-fp32}
  - quantize: {precision: int8, method: {name: static, calibrator: minmax, samples: 64}, name: int8}"""
    code, _, _ = run_quietly(pipeline_yaml(tmp_path, fashion_mnist, stages=stages), tmp_path / "runs")
    assert code == 0
    pixels = _screenshot(tmp_path / "runs" / "toy" / "report.html", tmp_path / "report.png", 6000)
    assert pixels.shape == (6000, 1280)
    drawn = (pixels < 250).mean(axis=1) > 0.01  # rows holding text, tables or pictures
    assert drawn[:2000].mean() > 0.3 and drawn[2000:4000].mean() > 0.3  # the images loaded: no blank page


def test_llm_report_html_renders_in_headless_chromium(llm_run, tmp_path: Path) -> None:
    """The causal-lm page: plots (trade-offs, latency vs batch, decode vs prompt length, per-window perplexity),
    continuations, failure card and cards, all inside the 1280 px width (no table running off the page)."""
    assert llm_run.code == 0, llm_run.stderr
    pixels = _screenshot(llm_run.run_dir / "report.html", tmp_path / "llm.png", 5000)
    assert pixels.shape == (5000, 1280)
    drawn = (pixels < 250).mean(axis=1) > 0.01
    assert drawn[:1500].mean() > 0.3 and drawn[1500:3000].mean() > 0.3  # tables and inlined images drawn
    assert (pixels[:, 1250:] > 250).all()  # the right margin stays blank: long continuations wrap
