"""Validating a pipeline must stay light: no torch, ONNX Runtime or transformers at import."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "onnxruntime", "transformers", "torch_pruning", "matplotlib", "tensorrt")


def _heavy_after(code: str) -> list[str]:
    """Heavy libraries in sys.modules after running `code` in a fresh interpreter."""
    script = f"import sys\n{code}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return eval(out.strip().splitlines()[-1])  # a list literal printed above


def test_cli_config_and_registries_import_no_heavy_library() -> None:
    code = (
        "import compress.cli, compress.config\n"
        "from compress.registry import registered_adapters, registered_stages\n"
        "registered_stages(); registered_adapters()"
    )
    assert _heavy_after(code) == []


def _modules() -> list[str]:
    """Every adapter module (`ADAPTER_MODULES`) and every module under compress/stages/."""
    import pkgutil

    import compress.stages
    from compress.registry import ADAPTER_MODULES

    stages = [m.name for m in pkgutil.walk_packages(compress.stages.__path__, "compress.stages.")]
    return [*ADAPTER_MODULES, *stages]


def test_every_adapter_and_stage_module_imports_no_heavy_library() -> None:
    # One interpreter for all: if their union is light, each is. On failure, name the modules that are not.
    modules = _modules()
    assert "compress.stages.quantize.int4" in modules and "compress.families.text_encoder.adapter" in modules
    if _heavy_after("\n".join(f"import {m}" for m in modules)):
        heavy = {m: found for m in modules if (found := _heavy_after(f"import {m}"))}
        pytest.fail(f"modules that pull in a heavy library at import: {heavy}")


def test_python_dash_m_compress_is_the_cli_and_loads_no_heavy_library() -> None:
    """`python -m compress` runs the same parser as the `compress` script, and `--help` stays light."""
    code = (
        "import sys, runpy\n"
        "sys.argv = ['compress', '--help']\n"
        "try:\n"
        "    runpy.run_module('compress', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code"
    )
    assert _heavy_after(code) == []
    out = subprocess.run([sys.executable, "-m", "compress", "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usage: compress") and "run" in out.stdout
