"""AutoRound (Cheng et al., arXiv 2309.05516): sign-gradient descent on each weight's rounding offset and
clipping range, one decoder block at a time, minimising the block's output error on calibration data.

Not written here: Intel's `auto-round` package (the `autoround` extra) does the tuning; it runs on the CPU
with the torch model in memory. This module only hands it our calibration windows and our layer selection,
then reads back what it leaves on each Linear (the fake-quantized weight, `scale`, `zp`) as this project's
`QuantizedWeight`, checking that the codes reproduce the weight it wrote. Its defaults (200 iterations per
block, lr = 1 / iters, min-max tuning on) are the paper's; `torch.compile` is off (it costs more than it
saves for a few windows on a CPU).

Usage::

    qws = autoround_quantize_model(model, tokenizer, batches, config=AutoRoundConfig(group_size=32))
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from pydantic import Field
from torch import nn

from compress.errors import StageError
from compress.quant.algorithms.sequential import LinearFilter, as_model_kwargs, default_filter
from compress.quant.primitives.qparams import column_groups
from compress.quant.primitives.weight import QuantizedWeight, WeightQuantConfig

#: largest |codes · scale − weight| accepted when reading the package's result back (its scales are fp16,
#: the product is float32: a larger gap means the weight is not what the codes say)
READBACK_ATOL = 1e-5


class AutoRoundConfig(WeightQuantConfig):
    """AutoRound options (adds to bits / group_size / symmetric)."""

    iters: int = Field(200, ge=1, description="sign-gradient steps per decoder block")
    lr: float | None = Field(None, gt=0, description="learning rate; None: 1 / iters (the package's default)")
    amp: bool = Field(False, description="tune in bfloat16 autocast (faster on AMX CPUs; float32 when off)")
    seed: int = 0


def _windows(batches: Iterable[Any]) -> list[torch.Tensor]:
    """Calibration batches -> the `(1, T)` token tensors the package takes as a dataset (all of one length)."""
    rows: list[torch.Tensor] = []
    for batch in batches:
        ids = as_model_kwargs(batch[0] if isinstance(batch, tuple) else batch)["input_ids"]
        rows.extend(row.unsqueeze(0) for row in ids)
    if not rows:
        raise StageError("autoround: no calibration windows")
    lengths = {int(r.shape[1]) for r in rows}
    if len(lengths) != 1:
        raise StageError(f"autoround: calibration windows of lengths {sorted(lengths)}; they must be of one length")
    return rows


@contextlib.contextmanager
def _quiet_package() -> Iterator[None]:
    """The package logs every block at INFO and warns about how options are passed; keep its warnings."""
    log = logging.getLogger("autoround")
    before = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(before)


def _read_back(name: str, module: nn.Linear, config: WeightQuantConfig) -> QuantizedWeight:
    """The package's fake-quantized weight, `scale` and `zp` on `module` -> codes, checked against the weight."""
    scale = getattr(module, "scale", None)
    if scale is None:
        raise StageError(f"autoround: {name} was selected but the package left no scale on it")
    w = module.weight.detach().float()
    out_f, in_f = w.shape
    scales = scale.float().reshape(out_f, -1)
    half = 2 ** (config.bits - 1)
    if config.symmetric:  # codes in [-half, half - 1], zero point `half` in our unsigned layout
        zeros = torch.full_like(scales, float(half))
    else:
        zeros = torch.as_tensor(module.zp).float().reshape(out_f, -1)
    gi = column_groups(in_f, config.group_size)
    codes = torch.round(w / scales[:, gi] + zeros[:, gi]).clamp(0, 2**config.bits - 1)
    qw = QuantizedWeight(
        qweight=codes.to(torch.uint8),
        scales=scales,
        zeros=zeros.to(torch.uint8),
        group_size=config.group_size,
        bits=config.bits,
        symmetric=config.symmetric,
    )
    gap = float((qw.dequantize() - w).abs().max())
    if gap > READBACK_ATOL:
        raise StageError(f"autoround: {name}: its codes reproduce the tuned weight only within {gap:.2e}")
    return qw


def autoround_quantize_model(
    model: nn.Module,
    tokenizer: Any,
    calib_batches: Iterable[Any],
    *,
    layers_filter: LinearFilter = default_filter,
    config: AutoRoundConfig | None = None,
) -> dict[str, QuantizedWeight]:
    """Tune and quantize the selected Linears of a Hugging Face decoder in place (weights = dequantized codes).

    Linears the filter leaves out stay float (the package's `bits: 16`); `lm_head` is never touched here.
    """
    config = config or AutoRoundConfig()
    try:
        from auto_round import AutoRound
    except ImportError as exc:
        raise StageError(
            f"quantize int4 method autoround needs the `auto-round` package ({exc}); "
            "install it with: pip install -e '.[autoround]'"
        ) from None
    windows = _windows(calib_batches)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")}
    selected = {n for n, m in linears.items() if layers_filter(n, m)}
    if not selected:
        return {}
    fixed = {n: {"bits": 16} for n in linears if n not in selected}
    before = {n: set(vars(m)) for n, m in model.named_modules()}
    with _quiet_package():
        tuner = AutoRound(
            model,
            tokenizer,
            bits=config.bits,
            group_size=config.group_size,
            sym=config.symmetric,
            iters=config.iters,
            lr=config.lr,
            nsamples=len(windows),
            seqlen=int(windows[0].shape[1]),
            batch_size=min(8, len(windows)),
            dataset=windows,
            layer_config=fixed,
            device_map="cpu",
            amp=config.amp,
            enable_torch_compile=False,
            seed=config.seed,
        )
        tuned, _ = tuner.quantize()
    if tuned is not model:
        raise StageError("autoround: the package returned a new model instead of tuning this one in place")
    qws: dict[str, QuantizedWeight] = {}
    for name in sorted(selected):
        qws[name] = _read_back(name, linears[name], config)
    for name, module in model.named_modules():  # the package's bookkeeping (scale, zp, global_name, ...)
        for attr in set(vars(module)) - before.get(name, set()):
            delattr(module, attr)
    return qws
