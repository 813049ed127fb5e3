"""One intra-op thread: on the shared 2-core machine two torch threads contending with other jobs ran
these tiny models 20x slower (measured: 30 distillation steps 7 s vs 0.35 s)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
