"""Validating a pipeline must stay light: no torch, ONNX Runtime or transformers at import."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "onnxruntime", "transformers", "torch_pruning", "matplotlib", "tensorrt")


def test_cli_config_and_registries_import_no_heavy_library() -> None:
    code = (
        "import sys\n"
        "import compress.cli, compress.config\n"
        "from compress.registry import registered_adapters, registered_stages\n"
        "registered_stages(); registered_adapters()\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
