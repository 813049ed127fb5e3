"""Fake-quant of a CNN in torch in ONNX Runtime's static Q/DQ arithmetic (QAT before `quantize_static`).

Not `torch.ao.quantization` (deprecated in this torch, and its observers follow its own qscheme rules, not
ORT's): torch's differentiable `fake_quantize_per_{channel,tensor}_affine` ops (straight-through gradients)
with the scales and zero points ORT's `compute_scale_zp` gives (`onnxruntime.quantization.quant_utils`), so
that what the fine-tune sees is what `quantize_static` then writes:

- BatchNorm folded into the conv before it (`fuse_conv_bn_eval`): the ONNX export folds it, so the weights
  ORT quantizes are the folded ones.
- Weights: symmetric int8, per output channel (or per tensor), scale max|w| / 127 (/ 64 with reduce_range),
  recomputed from the current weights at every step as ORT computes it from the final ones.
- Activations: one fake-quant per tensor where ORT's QDQ quantizer puts a Q/DQ pair on a CNN (read off
  MobileNetV2's INT8 graph): every input of Conv / Linear (Gemm), residual `add`, average pooling and flatten.
  uint8 asymmetric (int8 symmetric for a symmetric target), ranges from running min/max on calibration
  batches, then an exponential moving average of each training batch's min/max.

Not simulated: the Q/DQ ORT puts on the logits (a Gemm's output): its clamp to the calibration range stops
the gradient of every logit that leaves it, which is where the task loss pushes the right one (the rounding
itself is 1/255 of the logit range). Nor the int32 bias codes (scale input·weight), nor ORT's calibrator
(the percentile / entropy ranges the stage computes on the exported graph afterwards; the training sees min/max).
The graph comes from `torch.fx.symbolic_trace`; a model it cannot trace is refused with the tracer's reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from compress.errors import StageError

if TYPE_CHECKING:
    import torch

#: EMA weight of a training batch's min / max in an activation range
MOMENTUM = 0.01


@dataclass(frozen=True)
class QatScheme:
    """What `quantize_static` is asked for: per-channel weights, 7-bit weights, symmetric int8 activations."""

    per_channel: bool = True
    reduce_range: bool = False
    symmetric_activations: bool = False

    def weight_range(self) -> tuple[int, int]:
        """(qmin, qmax) of the weights: ORT's symmetric int8 (-127, 127), reduced (-64, 64)."""
        return _qrange(signed=True, reduce_range=self.reduce_range, symmetric=True)

    def activation_range(self) -> tuple[int, int]:
        """(qmin, qmax) of the activations: uint8 (0, 255), or int8 (-127, 127) when symmetric."""
        return _qrange(signed=self.symmetric_activations, reduce_range=False, symmetric=self.symmetric_activations)


def _qrange(*, signed: bool, reduce_range: bool, symmetric: bool) -> tuple[int, int]:
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qtype = TensorProto.INT8 if signed else TensorProto.UINT8
    qmin, qmax = get_qmin_qmax_for_qType(qtype, reduce_range=reduce_range, symmetric=symmetric)
    return int(qmin), int(qmax)


def ort_scale_zero_point(rmin: float, rmax: float, qmin: int, qmax: int, symmetric: bool) -> tuple[float, int]:
    """ORT's (scale, zero point) for the float range [rmin, rmax] (its own `compute_scale_zp`)."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    dtype = np.int8 if qmin < 0 else np.uint8
    zero, scale = compute_scale_zp(
        np.array(rmin, np.float32), np.array(rmax, np.float32), dtype(qmin), dtype(qmax), symmetric=symmetric
    )
    return float(scale), int(zero)


def _torch():
    import torch

    return torch


class WeightFakeQuant(_torch().nn.Module):
    """A parametrization of a Conv / Linear weight: symmetric fake-quant, per output channel or per tensor."""

    def __init__(self, scheme: QatScheme) -> None:
        super().__init__()
        self.qmin, self.qmax = scheme.weight_range()
        self.per_channel = scheme.per_channel

    def scales(self, weight: torch.Tensor) -> torch.Tensor:
        """max|w| · 2 / (qmax - qmin) per output channel (one value per tensor), 1 where the channel is all
        zero (ORT's `compute_scale_zp` for a symmetric range)."""
        torch = _torch()
        w = weight.detach()
        absmax = w.abs().flatten(1).amax(1) if self.per_channel else w.abs().amax().reshape(1)
        scale = absmax * 2 / (self.qmax - self.qmin)
        return torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        torch = _torch()
        scale = self.scales(weight)
        if self.per_channel:
            zero = torch.zeros(len(scale), dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, self.qmin, self.qmax)
        return torch.fake_quantize_per_tensor_affine(
            weight, scale, torch.zeros(1, dtype=torch.int32), self.qmin, self.qmax
        )


class ActivationFakeQuant(_torch().nn.Module):
    """Per-tensor fake-quant of an activation with a running range.

    mode `observe`: the range grows to every batch's min / max (calibration); `train`: it moves towards each
    batch's min / max by MOMENTUM, then fake-quantizes; `frozen`: fake-quant with the range as it is;
    `off`: identity (the float model the stage exports)."""

    def __init__(self, scheme: QatScheme) -> None:
        super().__init__()
        torch = _torch()
        self.qmin, self.qmax = scheme.activation_range()
        self.symmetric = scheme.symmetric_activations
        self.register_buffer("low", torch.tensor(float("inf")))
        self.register_buffer("high", torch.tensor(float("-inf")))
        self.mode = "observe"

    def quant_params(self) -> tuple[float, int]:
        """ORT's (scale, zero point) for the current range."""
        if not bool(self.low <= self.high):
            raise StageError("qat: an activation range was never observed (no calibration batch reached it)")
        return ort_scale_zero_point(float(self.low), float(self.high), self.qmin, self.qmax, self.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        torch = _torch()
        lo, hi = x.detach().amin(), x.detach().amax()
        if self.mode == "observe":
            self.low.copy_(torch.minimum(self.low, lo))
            self.high.copy_(torch.maximum(self.high, hi))
            return x
        if self.mode == "train":
            self.low.lerp_(lo, MOMENTUM)
            self.high.lerp_(hi, MOMENTUM)
        scale, zero = self.quant_params()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, self.qmin, self.qmax)


#: torch.fx call targets (functions / methods) whose inputs ORT's QDQ quantizer quantizes on a CNN
_QUANTIZED_CALLS = frozenset({operator.add, "add", "flatten"})
_QUANTIZED_FUNCTION_NAMES = frozenset({"add", "flatten", "adaptive_avg_pool2d", "avg_pool2d"})


def _quantized_consumer(node, modules) -> bool:  # noqa: ANN001 - torch.fx Node, {name: Module}
    torch = _torch()
    if node.op == "call_module":
        module = modules[node.target]
        return isinstance(
            module,
            torch.nn.Conv1d
            | torch.nn.Conv2d
            | torch.nn.Linear
            | torch.nn.AdaptiveAvgPool2d
            | torch.nn.AvgPool2d
            | torch.nn.Flatten,
        )
    if node.op == "call_function":
        return node.target in _QUANTIZED_CALLS or getattr(node.target, "__name__", "") in _QUANTIZED_FUNCTION_NAMES
    if node.op == "call_method":
        return node.target in _QUANTIZED_CALLS
    return False


@dataclass
class QatModel:
    """The traced, BN-folded model with its fake-quant points (`prepare`)."""

    module: torch.nn.Module  # a torch.fx GraphModule
    weights: list[str]  # qualified names of the fake-quantized Conv / Linear
    activations: list[ActivationFakeQuant]
    folded: int  # BatchNorms folded

    def set_mode(self, mode: str) -> None:
        for fq in self.activations:
            fq.mode = mode

    def strip(self) -> torch.nn.Module:
        """The float model to export: weight parametrizations removed (trained weights kept), activation
        fake-quant off (identity, nothing in the exported graph)."""
        from torch.nn.utils import parametrize

        for name in self.weights:
            parametrize.remove_parametrizations(self.module.get_submodule(name), "weight", leave_parametrized=False)
        self.weights = []
        self.set_mode("off")
        return self.module


def prepare(model: torch.nn.Module, scheme: QatScheme) -> QatModel:
    """Trace `model` (eval mode), fold each BatchNorm into the conv that alone feeds it, and add the fake-quant
    points of the module docstring. The result computes on the same parameters it fake-quantizes."""
    torch = _torch()
    from torch.nn.utils import parametrize
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # the tracer raises whatever the model's Python does on proxies
        raise StageError(f"qat: torch.fx cannot trace this model ({type(exc).__name__}: {exc})") from None
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(
            modules[node.target], torch.nn.BatchNorm1d | torch.nn.BatchNorm2d
        ):
            continue
        conv = node.args[0]
        if getattr(conv, "op", None) != "call_module" or len(conv.users) != 1:
            continue
        if not isinstance(modules[conv.target], torch.nn.Conv1d | torch.nn.Conv2d):
            continue
        fused = fuse_conv_bn_eval(modules[conv.target], modules[node.target])
        _set_submodule(gm, conv.target, fused)
        modules[conv.target] = fused
        node.replace_all_uses_with(conv)
        gm.graph.erase_node(node)
        folded += 1
    weights = []
    for name, module in gm.named_modules():
        if isinstance(module, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Linear):
            parametrize.register_parametrization(module, "weight", WeightFakeQuant(scheme))
            weights.append(name)
    modules = dict(gm.named_modules())
    activations: list[ActivationFakeQuant] = []
    for node in list(gm.graph.nodes):
        readers = [u for u in node.users if _quantized_consumer(u, modules)]
        if not readers:
            continue
        fq = ActivationFakeQuant(scheme)
        name = f"qat_act_{len(activations)}"
        gm.add_submodule(name, fq)
        with gm.graph.inserting_after(node):
            quantized = gm.graph.call_module(name, (node,))
        for user in readers:
            user.replace_input_with(node, quantized)
        activations.append(fq)
    gm.graph.lint()
    gm.recompile()
    return QatModel(gm, weights, activations, folded)


def _set_submodule(root, target: str, module) -> None:  # noqa: ANN001 - torch Modules
    parent, _, leaf = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)
