"""The quantization library stays light: no transformers / safetensors / onnxruntime at import time."""

from __future__ import annotations

import subprocess
import sys


def test_int4_import_is_light() -> None:
    code = (
        "import sys, compress.quant.algorithms, compress.quant.targets, compress.quant.primitives.weight; "
        "print(sorted(m for m in ('transformers', 'safetensors', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
