"""The processes one `compress run` is spread over: one (the default), or N started by a launcher.

    accelerate launch --multi_gpu --num_processes 2 -m compress.cli run pipelines/X.yaml   # also on CPU (gloo)

A launcher (accelerate launch --multi_gpu, torchrun) sets WORLD_SIZE / RANK / LOCAL_RANK; without them
nothing here imports accelerate or starts a process group, so a single-process run is what it always was.
With them, accelerate's `PartialState` joins the group: gloo when there is no CUDA device, else NCCL.
Rank 0 (the leader) does every write; the others (followers) only train (README "Multi-GPU distillation").
"""

from __future__ import annotations

import functools
import os
from datetime import timedelta
from typing import Any

from compress.errors import ConfigError, StageError

#: followers wait in a collective while the leader evaluates and benchmarks: gloo's 30-minute default is short
GROUP_TIMEOUT = timedelta(hours=12)


class Processes:
    """Rank, size and the few collectives the runner and the training loops need."""

    def __init__(self, rank: int = 0, world: int = 1, local_world: int = 1) -> None:
        self.rank, self.world, self.local_world = rank, world, local_world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a picklable object sent over the process group, never a file)."""
        if not self.distributed:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def mean(self, values: list[float]) -> list[float]:
        """The mean over ranks of each of `values` (one all-reduce)."""
        if not self.distributed:
            return values
        import torch
        from accelerate.utils import reduce

        return reduce(torch.tensor(values, dtype=torch.float64, device=device()), "mean").tolist()


def accelerator(what: str) -> Any:
    """accelerate's Accelerator for this launch: DDP when N-wide, mixed precision as `accelerate launch` was
    told. FSDP shards the model and its optimizer state, which our training loops' checkpoints and in-place
    results do not handle yet: refused, naming what to run instead (`what`: the loop, for the message)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    processes()  # join the process group with our timeout before accelerate would with its default
    acc = Accelerator(cpu=use_cpu())
    if acc.distributed_type == DistributedType.FSDP:
        raise StageError(
            f"{what} under FSDP is not implemented (sharded checkpoints and gathering the trained model are not "
            "written yet); launch without --use_fsdp / an FSDP config: "
            "accelerate launch --multi_gpu --num_processes N -m compress.cli run PIPELINE (DDP)"
        )
    return acc


def use_cpu() -> bool:
    """Train on the CPU (gloo) unless CUDA is there; one answer for the runner and every Accelerator."""
    import torch

    return not torch.cuda.is_available()


def device() -> Any:
    """The torch device this rank trains on (cuda:LOCAL_RANK with GPUs, else cpu)."""
    import torch

    if processes().distributed:
        from accelerate import PartialState

        return PartialState().device
    return torch.device("cpu")


@functools.cache
def processes() -> Processes:
    """This process's place in the launch, joining the process group on first call when launched N-wide."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _refuse_silent_single_process()
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=use_cpu(), timeout=GROUP_TIMEOUT)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return Processes(rank=state.process_index, world=state.num_processes, local_world=local)


def _refuse_silent_single_process() -> None:
    """`accelerate launch --num_processes 2` on a machine without CUDA starts ONE process (its simple
    launcher needs mpirun for more); it sets MASTER_PORT but no WORLD_SIZE. Running that as a 1-process job
    would look like a 2-process result, so we stop and say which command starts N processes."""
    if "ACCELERATE_MIXED_PRECISION" in os.environ and "MASTER_PORT" in os.environ and "LOCAL_RANK" not in os.environ:
        raise ConfigError(
            "accelerate launch started a single process: without CUDA GPUs, `accelerate launch --num_processes N` "
            "needs --multi_gpu to start N processes (they then train on the CPU with gloo): "
            "OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 -m compress.cli run PIPELINE"
        )
