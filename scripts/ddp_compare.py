"""2 CPU processes (DDP or FSDP over gloo) vs 1 process: the figures of README "Multi-GPU distillation".

    flock /tmp/compress-heavy.lock .venv/bin/python scripts/ddp_compare.py [--steps 200] [--engine fsdp]

1. The distillation loop on the toy MLP of tests/distill (6 batches of 16 rows, 30 steps, a feature term):
   its loss curve in one process and on 2 processes of 8 rows each (`accelerate launch --multi_gpu`, or
   with --engine fsdp `accelerate launch --use_fsdp --fsdp_version 2 ...`: the student sharded, compress.fsdp).
2. The tiny pipeline (a BatchNorm-free CNN on 960 Fashion-MNIST images at 28 px: finetune 20 steps ->
   prune 30% of channels -> distill --steps steps, batch 32) run by `compress run` in one process with 2
   threads and by `accelerate launch --multi_gpu --num_processes 2 -m compress.cli run` (1 thread each):
   stage times, final distillation loss, top-1 on 300 test images, largest weight difference.
Needs Fashion-MNIST (apt-get install dataset-fashion-mnist). Prints markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
sys.path[:0] = [str(REPO), str(TESTS), str(TESTS / "distill")]

from compress import fsdp  # noqa: E402

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), str(TESTS / "distill"), os.environ.get("PYTHONPATH", "")]),
}


ENGINES = {
    "ddp": ["--multi_gpu"],
    "fsdp": list(fsdp.LAUNCH_FLAGS),
}
ENGINE = "ddp"  # set by --engine


def _launch(*args: str) -> tuple[float, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    command = [sys.executable, "-m", "accelerate.commands.launch", *ENGINES[ENGINE], "--num_processes", "2"]
    start = time.perf_counter()
    proc = subprocess.run(
        [*command, "--main_process_port", port, "--quiet", *args], env=ENV, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"2-process launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc.stdout + proc.stderr


def loop_curves(tmp: Path) -> None:
    import torch
    from ddp_worker import OPTIONS, run

    from compress.tensorfile import read_tensors

    torch.set_num_threads(1)
    start = time.perf_counter()
    student, one = run(OPTIONS)
    one_s = time.perf_counter() - start
    two_s, _ = _launch(str(TESTS / "distill" / "ddp_worker.py"), str(tmp / "two.safetensors"))
    tensors, meta = read_tensors(tmp / "two.safetensors")
    two = json.loads(meta["losses"])
    weights = max((student.state_dict()[k] - v).abs().max().item() for k, v in tensors.items())
    print(f"| step | loss, 1 process x 16 rows | loss, 2 processes x 8 rows ({ENGINE}) | difference |")
    print("|---|---|---|---|")
    for step in (1, 5, 10, 15, 20, 25, 30):
        a, b = one[step - 1], two[step - 1]
        print(f"| {step} | {a:.6f} | {b:.6f} | {abs(a - b):.1e} |")
    print(
        f"\nLargest difference: loss {max(abs(a - b) for a, b in zip(one, two, strict=True)):.1e}, "
        f"weights {weights:.1e}. Wall time: 1 process {one_s:.1f} s (in this process), 2 processes "
        f"{two_s:.1f} s (with the launch and imports).\n"
    )


def pipeline_runs(tmp: Path, steps: int) -> None:
    from toys import pipeline_yaml

    from compress.tensorfile import read_tensors

    stages = f"""
  - finetune: {{steps: 20, lr: 1.0e-2, batch_size: 32}}
  - prune: {{importance: l2, target: {{channels: 0.3}}, round_to: 1}}
  - distill: {{max_steps: {steps}, lr: 3.0e-3, batch_size: 32}}"""
    fashion = Path(os.environ.get("COMPRESS_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
    pipeline = pipeline_yaml(
        tmp, fashion, name="ddp", source="python:ddp_toys:plain_cnn", stages=stages, gates="{}", extra="threads: 2"
    )
    args = ["run", str(pipeline), "--no-bench", "--quiet"]
    start = time.perf_counter()
    single = [sys.executable, "-m", "compress.cli", *args, "--runs-dir", str(tmp / "one")]
    subprocess.run(single, env={**ENV, "OMP_NUM_THREADS": "2"}, check=True, capture_output=True)
    walls = {"one": time.perf_counter() - start}
    walls["two"], _ = _launch("-m", "compress.cli", *args, "--runs-dir", str(tmp / "two"))
    rows = {}
    for name in ("one", "two"):
        manifest = json.loads((tmp / name / "ddp" / "manifest.json").read_text())
        rows[name] = {r["artifact"]["name"]: r for r in manifest["artifacts"]}
    a, _ = read_tensors(tmp / "one" / "ddp" / "distill" / "model.safetensors")
    b, _ = read_tensors(tmp / "two" / "ddp" / "distill" / "model.safetensors")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print("| run | finetune s | distill s | distill final loss | distill top-1 | wall s |\n|---|---|---|---|---|---|")
    for name, label in (("one", "1 process, 2 threads"), ("two", f"2 processes ({ENGINE}), 1 thread each")):
        ft, ds = rows[name]["finetune"]["artifact"]["info"], rows[name]["distill"]["artifact"]["info"]
        top1 = rows[name]["distill"]["evaluation"]["metrics"]["top1"]
        print(
            f"| {label} | {ft['seconds']} | {ds['distill_seconds']} | {ds['final_loss']} | {top1:.2f} | "
            f"{walls[name]:.0f} |"
        )
    print(f"\nLargest weight difference of the distilled student, 1 vs 2 processes: {diff:.1e}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="distillation steps of the pipeline")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="ddp", help="how the 2 processes train")
    args = parser.parse_args()
    global ENGINE
    ENGINE = args.engine
    with tempfile.TemporaryDirectory(prefix="ddp-compare-") as tmp:
        loop_curves(Path(tmp))
        pipeline_runs(Path(tmp), args.steps)


if __name__ == "__main__":
    main()
