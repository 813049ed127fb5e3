"""One rank of the N-process distillation test: `accelerate launch --multi_gpu --num_processes 2 ddp_worker.py OUT`.

Distils the distill_toys student exactly as `test_ddp.py` does in one process, and rank 0 writes the
student's weights and the loss curve to OUT (safetensors; the losses in its metadata).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from distill_toys import MLP, teacher_and_data  # noqa: E402

from compress.distill import DistillOptions, FeaturePair, distill  # noqa: E402
from compress.distributed import leave, processes  # noqa: E402
from compress.tensorfile import write_tensors  # noqa: E402


def run(options: DistillOptions, checkpoint_dir: Path | None = None) -> tuple[MLP, tuple[float, ...]]:
    """The student and loss curve of the test's distillation (the same in every process count)."""
    teacher, data = teacher_and_data(batches=6, batch_size=16)
    torch.manual_seed(7)
    student = MLP(16)
    report = distill(student, teacher, data, options, checkpoint_dir=checkpoint_dir)
    return student, report.losses


OPTIONS = DistillOptions(
    max_steps=30,
    lr=1e-2,
    warmup_steps=3,
    alpha=0.7,
    features=(FeaturePair(student="body.0", teacher="body.0"),),  # 16 -> 64: a learned projection
    feature_weight=0.5,
)

if __name__ == "__main__":
    torch.set_num_threads(1)
    student, losses = run(OPTIONS)
    procs = processes()
    if procs.is_main:
        write_tensors(
            Path(sys.argv[1]), dict(student.state_dict()), {"losses": json.dumps(losses), "world": str(procs.world)}
        )
    # as the runner does (follower.finish): all ranks meet, then leave the gloo group before interpreter exit,
    # which can otherwise SIGABRT a rank after its work is done (seen in CI, 2026-12-04)
    procs.barrier()
    leave()
