"""Run a torch module eagerly on CPU."""

from __future__ import annotations

import numpy as np
import torch


class TorchSession:
    backend = "torch"

    def __init__(self, model: torch.nn.Module, input_names: list[str], *, threads: int) -> None:
        self.model = model.eval()
        self.input_names = input_names
        self.threads = threads

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self.model(*(torch.from_numpy(inputs[name]) for name in self.input_names))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.numpy() for o in outs]
