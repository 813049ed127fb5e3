"""Built-in vision backbones (no torchvision or timm needed): the one list of them, `BUILTINS`.

Each backbone is one file here with torchvision's module names (so torchvision state dicts load as they
are, or through its `from_torchvision(state)` where a layer is laid out for pruning) and a
`from_timm(state)` that renames a timm state dict to them. Adding one = its file, one entry
below, one tiny test. Importing this module imports no torch: a definition is imported when it is built.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Builtin:
    """`function` of `compress.families.vision.models.<module>`; `sized`: it takes the input size too (ViTs)."""

    module: str
    function: str
    sized: bool = False

    def _module(self):  # noqa: ANN202 - a module
        return importlib.import_module(f"{__name__}.{self.module}")

    def build(self, image_size: int) -> torch.nn.Module:
        fn = getattr(self._module(), self.function)
        return fn(image_size=image_size) if self.sized else fn()

    @property
    def from_timm(self) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
        """Renames a timm state dict to this definition's keys; None where no map is written (MobileNetV2)."""
        return getattr(self._module(), "from_timm", None)

    @property
    def from_torchvision(self) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
        """Renames a torchvision state dict where this definition's keys differ (ViT's packed q, k, v); else None."""
        return getattr(self._module(), "from_torchvision", None)

    @property
    def file(self) -> str:
        """The definition's source file: cache keys hash it, so an edited definition rebuilds its artifacts."""
        spec = importlib.util.find_spec(f"{__name__}.{self.module}")
        return spec.origin if spec and spec.origin else ""


BUILTINS: dict[str, Builtin] = {
    "mobilenet_v2": Builtin("mobilenet_v2", "mobilenet_v2"),
    "resnet18": Builtin("resnet", "resnet18"),
    "resnet50": Builtin("resnet", "resnet50"),
    "vit_b_16": Builtin("vit", "vit_b_16", sized=True),
    "vit_s_16": Builtin("vit", "vit_s_16", sized=True),
    "vit_ti_16": Builtin("vit", "vit_ti_16", sized=True),
    "efficientnet_b0": Builtin("efficientnet", "efficientnet_b0"),
    "convnext_tiny": Builtin("convnext", "convnext_tiny"),
}
