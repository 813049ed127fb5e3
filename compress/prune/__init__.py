"""Structured pruning: CNNs via torch-pruning (`vision`), Llama-style decoders by our own code (`llama`)."""

from compress.prune.llama import LlamaPruneReport, planned_sizes, prune_llama
from compress.prune.options import PruneOptions, PruneTarget
from compress.prune.serialize import load_module, save_module
from compress.prune.vision import LayerChannels, PruneReport, prune_vision

__all__ = [
    "LayerChannels",
    "LlamaPruneReport",
    "PruneOptions",
    "PruneReport",
    "PruneTarget",
    "load_module",
    "planned_sizes",
    "prune_llama",
    "prune_vision",
    "save_module",
]
