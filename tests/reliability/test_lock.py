"""One `compress run` per run folder: a second one refuses with exit 6 naming the holder, or waits with --wait.

The holder is a real second process that takes the lock through `compress.lock.run_lock`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from toys import pipeline_yaml

from compress.cli import EXIT_LOCKED, EXIT_OK, main
from compress.errors import RunLockedError
from compress.lock import LOCK_FILE, run_lock

HOLDER = """
import sys, time
from pathlib import Path
from compress.lock import run_lock

with run_lock(Path(sys.argv[1]), wait=False, say=print):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(run_dir: Path, seconds: float) -> subprocess.Popen:
    """A second process holding `run_dir`'s lock for `seconds`; returns once it holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir), str(seconds)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def pipeline(tmp_path, fashion_mnist) -> Path:
    return pipeline_yaml(tmp_path, fashion_mnist, stages="\n  - export: {opset: 17, name: onnx-fp32}", gates="{}")


def _run(pipeline: Path, runs: Path, *flags: str) -> int:
    return main(["run", str(pipeline), "--runs-dir", str(runs), "--quiet", "--no-bench", "--no-eval", *flags])


def test_second_run_refuses_at_once_naming_the_holder(pipeline, tmp_path, capsys) -> None:
    run_dir = tmp_path / "runs" / "toy"
    holder = _hold(run_dir, 60)
    try:
        assert _run(pipeline, tmp_path / "runs") == EXIT_LOCKED
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert str(run_dir) in err and f"pid {holder.pid}" in err and "--wait" in err
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # nothing else was touched


def test_wait_starts_when_the_holder_finishes(pipeline, tmp_path, capsys) -> None:
    holder = _hold(tmp_path / "runs" / "toy", 1.5)
    try:
        assert _run(pipeline, tmp_path / "runs", "--wait") == EXIT_OK
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert err.count(f"waiting for pid {holder.pid}") == 1
    assert (tmp_path / "runs" / "toy" / "manifest.json").is_file()


def test_a_crashed_holder_releases_the_lock(tmp_path) -> None:
    run_dir = tmp_path / "toy"
    holder = _hold(run_dir, 60)
    with pytest.raises(RunLockedError, match=f"pid {holder.pid}"), run_lock(run_dir, wait=False, say=print):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_lock(run_dir, wait=False, say=print):  # the lock file stays; the OS dropped the lock
        assert (run_dir / LOCK_FILE).read_text().strip() == str(os.getpid())
