"""Shared fixtures: real Fashion-MNIST slices and pipeline files for tiny models (see toys.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `python:toys:tiny_cnn` model sources resolve here

REPO = Path(__file__).resolve().parents[1]
FASHION = Path(os.environ.get("COMPRESS_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The real Fashion-MNIST folder. CI installs it (.ci/run); a missing copy fails there, skips elsewhere."""
    if not (FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"Fashion-MNIST missing at {FASHION}; .ci/run should have installed dataset-fashion-mnist")
        pytest.skip(f"Fashion-MNIST not installed at {FASHION} (apt-get install dataset-fashion-mnist)")
    return FASHION
