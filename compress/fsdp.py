"""FSDP: the student's parameters, gradients and optimizer state sharded across the processes of a launch.

    accelerate launch --use_fsdp --fsdp_version 2 --fsdp_cpu_ram_efficient_loading false --num_processes N \
        -m compress.cli run PIPELINE

We shard with torch's FSDP2 (`torch.distributed.fsdp.fully_shard`) ourselves instead of through
`Accelerator.prepare`: on a CPU accelerate 1.16 refuses FSDP1 ("sync_module_states=True is not supported on
cpu") and does not shard with FSDP2 there, while `fully_shard` works over gloo as over NCCL. The launcher
only tells us that FSDP was asked for (ACCELERATE_USE_FSDP / FSDP_VERSION, read by `check_launch`).

`Sharded` trains a sharded *twin* of the module: the module itself stays a plain torch module (the stages
save it, evaluate it and checkpoint it as in a 1-process run). `push` copies the module's full weights into
the twin, `pull` gathers the twin's full weights back into it, and the optimizer state is gathered to the
1-process format for checkpoints, so a checkpoint or artifact written under FSDP is the one DDP or one
process writes, and resumes under any of them. The teacher is not sharded (it is whole on every rank).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from compress.errors import ConfigError, StageError

#: the `accelerate launch` flags of an FSDP launch we honour (accelerate defaults fsdp_cpu_ram_efficient_loading on)
LAUNCH_FLAGS = ("--use_fsdp", "--fsdp_version", "2", "--fsdp_cpu_ram_efficient_loading", "false")
LAUNCH = f"accelerate launch {' '.join(LAUNCH_FLAGS)} --num_processes N -m compress.cli run PIPELINE"


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("true", "1", "yes")


def requested() -> bool:
    """Whether the launcher asked for FSDP (`accelerate launch --use_fsdp`, or an accelerate config with
    `distributed_type: FSDP`: both set ACCELERATE_USE_FSDP)."""
    return _flag("ACCELERATE_USE_FSDP")


def check_launch() -> None:
    """Refuse an FSDP launch we would not honour (ConfigError, exit 2), naming the command to use instead."""
    if not requested():
        return
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(
            f"FSDP_VERSION={version}: compress shards with FSDP2 (torch fully_shard) only; FSDP1 is not "
            f"supported. Launch with --fsdp_version 2: {LAUNCH}"
        )
    if _flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise ConfigError(
            "fsdp_cpu_ram_efficient_loading true is not supported: every rank loads the whole student from the "
            f"parent artifact, then it is sharded (accelerate's default is true). Launch with it false: {LAUNCH}"
        )
    if _flag("FSDP_ACTIVATION_CHECKPOINTING"):
        raise ConfigError(
            "fsdp_activation_checkpointing true is not supported: set `gradient_checkpointing: true` in the "
            f"distill stage of the pipeline instead, and launch without it: {LAUNCH}"
        )
    if _flag("FSDP_OFFLOAD_PARAMS"):
        raise ConfigError(f"fsdp_offload_params true (CPU offload) is not supported; launch without it: {LAUNCH}")
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision not in ("no", ""):
        raise ConfigError(
            f"--mixed_precision {precision} under FSDP is not supported (FSDP trains in float32 here); "
            f"launch without it: {LAUNCH}"
        )


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The modules that get an FSDP group of their own: Hugging Face's `_no_split_modules` (decoder layers,
    encoder blocks) inside `model`; everything else is in the root's group."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if m is not model and type(m).__name__ in names]


def _check_ties(model: nn.Module, blocks: list[nn.Module]) -> None:
    """A parameter used in two FSDP groups (two blocks, or a block and the root) is refused: FSDP2 shards
    each group's parameters on their own. Ties inside one group (a decoder's embedding and lm_head, both
    in the root group) are fine."""
    names = {id(m): n for n, m in model.named_modules()}
    group = {id(m): "" for m in model.modules()}  # "" is the root group
    for block in blocks:  # modules() lists an outer block before an inner one: the innermost wins
        for m in block.modules():
            group[id(m)] = names[id(block)]
    seen: dict[int, tuple[str, str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            here = (group[id(module)], f"{name}.{pname}")
            first = seen.setdefault(id(p), here)
            if first[0] != here[0]:
                raise StageError(
                    f"FSDP: the parameter {here[1]} is tied to {first[1]}, in another FSDP group; tied parameters "
                    "across FSDP groups are not supported. Train this student with DDP: "
                    "accelerate launch --multi_gpu --num_processes N -m compress.cli run PIPELINE"
                )


class Sharded:
    """A module trained as an FSDP2-sharded twin (module docstring). `model` is what the loop calls."""

    sharded = True

    def __init__(self, module: nn.Module, *, shared: tuple[Any, ...] = (), device_type: str = "cpu") -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.module = module
        # objects the module only refers to (a task, feature hooks) stay the same objects in the twin
        self.twin = copy.deepcopy(module, memo={id(x): x for x in shared})
        mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
        blocks = _blocks(self.twin)
        _check_ties(self.twin, blocks)
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.twin, mesh=mesh)
        self.model = self.twin
        self.push()

    def parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer steps: the twin's shards."""
        return [p for p in self.twin.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Keep this micro-batch's gradients local (accumulated, reduce-scattered with the last one)."""
        self.twin.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.twin.set_requires_gradient_sync(True)

    def push(self) -> None:
        """The module's full weights (rank 0's) into the twin's shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.twin, self.module.state_dict(), options=options)

    def pull(self) -> None:
        """The twin's full weights into the module, on every rank (a collective: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.twin, options=StateDictOptions(full_state_dict=True))
        with torch.no_grad():
            for name, value in self.module.state_dict(keep_vars=True).items():
                value.copy_(full[name])

    def _indices(self) -> dict[str, int]:
        """Parameter name -> its index in `parameters()`, the key of a 1-process optimizer's state."""
        return {n: i for i, (n, p) in enumerate((n, p) for n, p in self.twin.named_parameters() if p.requires_grad)}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The full optimizer state in `optimizer.state_dict()`'s 1-process format (a collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(self.twin, optimizer, options=StateDictOptions(full_state_dict=True))
        index = self._indices()
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
        return {"state": {index[n]: v for n, v in full["state"].items()}, "param_groups": groups}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a 1-process-format optimizer state (from any checkpoint) into the sharded optimizer: each
        full tensor the size of its parameter is sharded like the parameter (a collective)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = self.parameters()
        local: dict[int, dict[str, Any]] = {}
        for i, values in state["state"].items():
            p = params[int(i)]
            local[int(i)] = {
                k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape)
                else v
                for k, v in values.items()
            }
        optimizer.load_state_dict({**state, "state": local})
