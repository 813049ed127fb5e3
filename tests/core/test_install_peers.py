"""scripts/install_peers.sh: ggml's ISA options follow the CPU's cpuinfo flags (a fixed list gave SIGILL on
an AMD EPYC without AVX-VNNI); AMX stays off whatever the CPU has. Only `--print-isa-flags` runs here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install_peers.sh"
COMMON = "fpu sse4_2 avx f16c fma bmi2 avx2"
AVX512 = "avx512f avx512dq avx512cd avx512bw avx512vl avx512vbmi avx512_vnni avx512_bf16"


def isa_flags(tmp_path: Path, flags: str) -> dict[str, str]:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    out = subprocess.run(
        ["bash", str(SCRIPT), "--print-isa-flags"],
        env={"CPUINFO": str(cpuinfo), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return dict(item.removeprefix("-DGGML_").split("=") for item in out)


def test_amd_epyc_without_avx_vnni(tmp_path: Path) -> None:
    got = isa_flags(tmp_path, f"{COMMON} {AVX512} avx512ifma avx512_vbmi2")
    assert got["AVX_VNNI"] == "OFF"
    assert all(got[o] == "ON" for o in ("AVX2", "FMA", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"))


def test_intel_with_avx_vnni_and_amx(tmp_path: Path) -> None:
    got = isa_flags(tmp_path, f"{COMMON} avx_vnni {AVX512} amx_bf16 amx_tile amx_int8")
    assert got["AVX_VNNI"] == "ON" and got["AVX512"] == "ON"
    assert not any(k.startswith("AMX") for k in got)  # AMX is never turned on (the install line sets it OFF)


def test_avx512_needs_every_subset_and_first_line_only(tmp_path: Path) -> None:
    got = isa_flags(tmp_path, f"{COMMON} avx512f avx512dq avx512cd avx512vl")  # no avx512bw
    assert got["AVX512"] == "OFF" and got["AVX512_VNNI"] == "OFF"
    assert got["SSE42"] == "ON" and got["BMI2"] == "ON"
    assert len(got) == 11
