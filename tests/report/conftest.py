"""Fixture `llm_run`: one tiny causal-lm run as a user starts it (`compress run` in a subprocess, no terminal,
not `--quiet`): GPTQ and AWQ stages (each exports and checks parity), benchmarks with a decode prompt-length
sweep. Shared by the report tests that read its files, its console, and its page in a browser."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from llm_toys import tiny_pipeline

REPO = Path(__file__).resolve().parents[2]
STAGES = """
  - quantize: {precision: int4, method: {name: gptq, samples: 2}, group_size: 32, name: gptq, input: source}
  - quantize: {precision: int4, method: {name: awq, samples: 2}, group_size: 32, name: awq, input: source}"""
DATA = """{window: 64, evaluation_windows: 4, calibration_windows: 4, generation_tokens: 8,
       prompts: ["The for statement", "def"]}"""
BENCH = "bench: {batch_sizes: [1, 2], prompt_lengths: [16], decode_prompt_lengths: [8, 32], decode_tokens: 4, "
BENCH += "warmup: 1, iterations: 3}\n"


@dataclass(frozen=True)
class LLMRun:
    code: int
    run_dir: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def llm_run(tmp_path_factory: pytest.TempPathFactory) -> LLMRun:
    tmp = tmp_path_factory.mktemp("report-llm")
    pipeline = tiny_pipeline(tmp, "tinyllm", STAGES, data=DATA, gates="{ppl_rise_max: 50}")
    pipeline.write_text(pipeline.read_text() + BENCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    cmd = [sys.executable, "-c", "import sys; from compress.cli import main; sys.exit(main(sys.argv[1:]))"]
    proc = subprocess.run(
        [*cmd, "run", str(pipeline), "--runs-dir", str(tmp / "runs")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=600,
    )
    return LLMRun(proc.returncode, tmp / "runs" / "tinyllm", proc.stdout, proc.stderr)
