"""Which rows of a batch this process computes, and what its loss weighs, so N processes = one big batch.

`batch_size` is the optimizer's batch whatever the number of processes: with N processes, rank r takes the
r-th of N contiguous, nearly equal row blocks of each batch (what a DistributedSampler does with samples),
and splits it into `gradient_accumulation_steps` micro-batches. A micro-batch's mean loss is weighted by
`N * its rows / the batch's rows` (per loss term, counting the rows that term averages over), so the sum
over micro-batches and the mean over ranks that DDP takes is the gradient of the whole batch's mean loss:
2 processes x b rows == 1 process x 2b rows, up to float round-off. One process and one micro-batch give
the weight 1.0 exactly, so single-process training is unchanged bit for bit. (BatchNorm still sees only
its micro-batch's statistics, as under any DDP.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from compress.errors import StageError


def rows(value: Any) -> int:
    """The number of rows (dim 0) of the first tensor in a batch (a tensor, tuple/list or mapping of them)."""
    if isinstance(value, torch.Tensor):
        return int(value.shape[0])
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        try:
            return rows(item)
        except StageError:
            continue
    raise StageError(f"a training batch of type {type(value).__name__} holds no tensor to split across processes")


def cut(value: Any, lo: int, hi: int) -> Any:
    """Rows [lo, hi) of every tensor in a batch; other values are kept as they are."""
    if isinstance(value, torch.Tensor):
        return value[lo:hi]
    if isinstance(value, Mapping):
        return {k: cut(v, lo, hi) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(cut(v, lo, hi) for v in value)
    return value


def micro_batches(n_rows: int, rank: int, world: int, accumulation: int) -> list[tuple[int, int]]:
    """[lo, hi) row ranges of the micro-batches rank `rank` of `world` computes for a batch of `n_rows`."""
    if n_rows < world:
        raise StageError(
            f"a training batch of {n_rows} rows cannot be split across {world} processes: every process needs "
            "at least one row; raise batch_size or start fewer processes"
        )
    lo, hi = rank * n_rows // world, (rank + 1) * n_rows // world  # this rank's block
    parts = min(accumulation, hi - lo)  # a block smaller than the accumulation count uses one row per part
    return [(lo + i * (hi - lo) // parts, lo + (i + 1) * (hi - lo) // parts) for i in range(parts)]
