"""The processes one `compress run` is spread over: one (the default), or N started by a launcher.

    accelerate launch --multi_gpu --num_processes 2 -m compress.cli run pipelines/X.yaml   # also on CPU (gloo)

A launcher (accelerate launch --multi_gpu, torchrun) sets WORLD_SIZE / RANK / LOCAL_RANK; without them
nothing here imports accelerate or starts a process group, so a single-process run is what it always was.
With them, accelerate's `PartialState` joins the group: gloo when there is no CUDA device, else NCCL.
Rank 0 (the leader) does every write; the others (followers) only train (README "Multi-GPU distillation").
`prepare` hands the training loops the student whole on every rank (`Replicated`: DDP) or, under an FSDP
launch, sharded (`compress.fsdp.Sharded`).
"""

from __future__ import annotations

import functools
import os
from datetime import timedelta
from typing import Any

from compress.errors import ConfigError

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


class Replicated:
    """The module whole on every rank: accelerate's DDP when N-wide, the module itself in one process.
    The same methods as `compress.fsdp.Sharded`, so a training loop does not ask which it has."""

    sharded = False

    def __init__(self, module: Any) -> None:
        self.module = module
        self._acc = accelerator()
        self.model = self._acc.prepare_model(module, device_placement=False)  # DDP broadcasts rank 0's weights

    def parameters(self) -> list[Any]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def no_sync(self) -> Any:
        return self._acc.no_sync(self.model)

    def push(self) -> None:
        """Nothing to do: the module is what trains."""

    def pull(self) -> None:
        """Nothing to do: the module is what trains."""

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: Any, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)


def prepare(module: Any, *, shared: tuple[Any, ...] = ()) -> Replicated | Any:
    """The module ready to train on this launch: `Sharded` (compress.fsdp) under an FSDP launch, else
    `Replicated`. `shared`: objects the module refers to that a sharded twin must share, not copy."""
    from compress import fsdp

    if processes().distributed and fsdp.requested():
        return fsdp.Sharded(module, shared=shared, device_type="cpu" if use_cpu() else "cuda")
    return Replicated(module)


def shards() -> bool:
    """Whether the training stages of this launch shard the student (an FSDP launch on N > 1 processes)."""
    from compress import fsdp

    return processes().distributed and fsdp.requested()


def accelerator() -> Any:
    """accelerate's Accelerator for this launch: DDP when N-wide, mixed precision as `accelerate launch` was
    told (never FSDP: `prepare` shards with torch itself, see compress.fsdp)."""
    from accelerate import Accelerator

    processes()  # join the process group with our timeout before accelerate would with its default
    return Accelerator(cpu=use_cpu())


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
    from compress import fsdp

    fsdp.check_launch()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _refuse_silent_single_process()
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=use_cpu(), timeout=GROUP_TIMEOUT)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return Processes(rank=state.process_index, world=state.num_processes, local_world=local)


def leave() -> None:
    """Leave the process group, if one was joined, before the interpreter exits.

    Why: a gloo group left to interpreter teardown can abort a rank after its work is done ("terminate called
    without an active exception", SIGABRT), and the launcher then reports the whole job FAILED.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
