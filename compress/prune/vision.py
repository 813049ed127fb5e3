"""Structured (channel) pruning of CNN classifiers and backbones with torch-pruning.

torch-pruning (Fang et al. 2023, "DepGraph", arXiv 2301.12900) traces the model once and groups every
parameter slice that must shrink together: a conv's output channels with the next BatchNorm, the next
conv's input channels, both branches of a residual add, and the channels of a depthwise conv (whose
groups follow its input). We use its `BasePruner` rather than our own graph walk because that coupling is
the hard part and the library has it tested across torchvision/timm models.

Run on a toy model::

    from compress.prune import PruneOptions, prune_vision
    report = prune_vision(model, torch.randn(1, 3, 224, 224), PruneOptions(target={"macs": 0.4}))

Vision Transformers: an attention module that declares `prunable_heads` (the name of its packed q, k, v
`nn.Linear`) and `head_dim` loses whole heads through torch-pruning's own head pruning (`num_heads`,
`prune_num_heads`; `PruneOptions.heads_ratio` of every layer's heads, rounded up as torch-pruning does),
and its MLP hidden width is pruned as channels by `target`; heads keep their `head_dim`. A model naming
parameters in `pinned_widths` (a ViT's class token and position embeddings) keeps the width of every
layer those parameters are coupled with (the residual stream). A parameter outside the layers
torch-pruning resizes (e.g. a packed `in_proj_weight` that is not a Linear's), neither `pinned_widths` nor
`resizable_parameters`, is refused before any pruning: torch-pruning would cut it along its last
dimension blindly and the result could not be rebuilt from architecture.json. MACs here are those of
Conv/Linear layers: attention's Q·Kᵀ and ·V products, which shrink with the heads, are not counted.

Known limitation (torch-pruning 1.6.1): with `round_to` > 1, a channel group that feeds a grouped
(not depthwise) conv is rounded per conv-group against the conv's whole width and may be left unpruned;
use `round_to: 1` for such models. Depthwise convs (MobileNet, EfficientNet) are not affected.

The model is pruned IN PLACE (layers are replaced by smaller ones); deep-copy it first to keep the
original. The pruned model no longer matches its class's constructor, so it is saved with the widths each
layer now has beside its state dict (`compress.prune.serialize.save_module`; never a pickle).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from compress.errors import MissingDependencyError, StageError
from compress.prune.options import VISION_IMPORTANCES, PruneOptions

Inputs = torch.Tensor | tuple[torch.Tensor, ...]
ProgressFn = Callable[[int, int, float], None]  # (step, steps, MACs reduction so far)


@dataclass(frozen=True)
class LayerChannels:
    """Output channels (Conv) or features (Linear) of one layer before and after pruning."""

    name: str
    before: int
    after: int


@dataclass(frozen=True)
class PruneReport:
    """What pruning removed: MACs of every Conv/Linear instance (`count_macs`), parameters of the model."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    steps: int
    layers: tuple[LayerChannels, ...]

    @property
    def macs_reduction(self) -> float:
        return 1.0 - self.macs_after / self.macs_before

    @property
    def params_reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before


def _tp():  # noqa: ANN202 - module
    try:
        import torch_pruning
    except ImportError as err:
        raise MissingDependencyError("torch-pruning", "prune", "structured pruning of vision models") from err
    return torch_pruning


def _as_tuple(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _layer_widths(model: nn.Module) -> dict[str, int]:
    widths: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            widths[name] = module.out_channels
        elif isinstance(module, nn.Linear):
            widths[name] = module.out_features
    return widths


# torch-pruning's Conv/Linear counts add bias additions to ours; any larger gap means it does not see layers.
MACS_TOLERANCE = 0.01


def count_macs(model: nn.Module, example_inputs: Inputs) -> int:
    """Multiply-accumulates of every Conv and Linear instance, subclasses included, from one forward pass.

    torch-pruning's counter looks modules up by exact type, so a `Conv2d` subclass (the "static same
    padding" convolutions of EfficientNet ports) counts as zero there: a MACs target measured with it
    removes far more than asked. Hooks on every instance see them all.
    """
    total = 0

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        else:  # (B, C_out, *spatial) outputs, each a dot product over C_in/groups x kernel
            total += output.numel() * (module.in_channels // module.groups) * int(np.prod(module.kernel_size))

    _run_with_layer_hooks(model, example_inputs, lambda _name: hook)
    return total // _as_tuple(example_inputs)[0].shape[0]  # per sample, as torch-pruning counts


def _run_with_layer_hooks(model: nn.Module, example_inputs: Inputs, make_hook: Callable[[str], Callable]) -> None:
    """One forward pass with `make_hook(name)` as the forward hook of every Conv/Linear instance."""
    hooks = [
        module.register_forward_hook(make_hook(name))
        for name, module in model.named_modules()
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(*_as_tuple(example_inputs))
    finally:
        for handle in hooks:
            handle.remove()


def _uncounted_types(model: nn.Module) -> list[str]:
    """Conv/Linear subclasses torch-pruning's counter does not recognise (it matches exact types)."""
    exact = {nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear}
    found = {
        type(m).__name__
        for m in model.modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and type(m) not in exact
    }
    return sorted(found)


def _torch_pruning_count(model: nn.Module, example_inputs: Inputs) -> tuple[int, int]:
    """(MACs torch-pruning's counter finds in Conv/Linear modules, parameters)."""
    _, params, layer_macs, _ = _tp().utils.count_ops_and_params(model, example_inputs, layer_wise=True)
    layers = (nn.modules.conv._ConvNd, nn.Linear)
    return int(sum(v or 0 for m, v in layer_macs.items() if isinstance(m, layers))), int(params)


def _cross_check(ours: int, theirs: int, model: nn.Module) -> None:
    """Refuse when torch-pruning's count of the same layers disagrees with ours: a target would be wrong."""
    if abs(ours - theirs) <= MACS_TOLERANCE * ours:
        return
    skipped = _uncounted_types(model)
    why = f"; its counter skips the Conv/Linear subclasses {', '.join(skipped)}" if skipped else ""
    raise StageError(
        f"prune: the MACs counts disagree: {ours:,} MACs in every Conv/Linear instance, torch-pruning finds "
        f"{theirs:,}{why}. A MACs target measured by its count would be silently wrong: use plain "
        "nn.Conv2d/nn.Linear modules (e.g. a port with symmetric padding), or a channels target"
    )


def output_layers(model: nn.Module, example_inputs: Inputs) -> list[str]:
    """Names of the last Conv/Linear executed in the forward pass: its outputs are the model's outputs.

    Pruning its output channels would change the number of classes, so it is always kept.
    """
    order: list[str] = []
    _run_with_layer_hooks(model, example_inputs, lambda name: lambda _m, _i, _o: order.append(name))
    return order[-1:]


def _ignored_modules(model: nn.Module, globs: Sequence[str], always: Sequence[str]) -> list[nn.Module]:
    names = dict(model.named_modules())
    chosen = set(always)
    for pattern in globs:
        hits = [name for name in names if name and fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise StageError(
                f"prune.ignored_layers: '{pattern}' matches no module; module names look like "
                f"{[n for n in names if n][:6]}"
            )
        chosen.update(hits)
    return [names[name] for name in sorted(chosen)]


def _channel_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Parameters outside Conv/Linear/norm layers that pruning resizes along dim 0 (ConvNeXt's layer_scale)."""
    return [(getattr(m, name), 0) for m in model.modules() for name in getattr(m, "resizable_parameters", ())]


def _pinned_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters a module names in `pinned_widths` (paths below it): the widths they are coupled with stay."""
    return [m.get_parameter(path) for m in model.modules() for path in getattr(m, "pinned_widths", ())]


def _check_parameters(model: nn.Module) -> None:
    """Refuse parameters torch-pruning would cut along their last dimension without knowing what they are.

    These are its "unwrapped parameters": outside every layer type it has a pruner for, and not declared
    `resizable_parameters` (pruned along dim 0) or `pinned_widths` (kept).
    """
    tp = _tp()
    types = set(tp.pruner.function.PrunerBox)
    wrapped = {id(p) for m in model.modules() if tp.ops.module2type(m) in types for p in m.parameters()}
    declared = {id(p) for p, _ in _channel_parameters(model)} | {id(p) for p in _pinned_parameters(model)}
    loose = [
        f"{name} {tuple(p.shape)}"
        for name, p in model.named_parameters()
        if id(p) not in wrapped | declared and sum(size > 1 for size in p.shape) > 0
    ]
    if loose:
        raise StageError(
            f"prune: {len(loose)} parameter(s) lie outside the layers torch-pruning resizes: "
            f"{', '.join(loose[:4])}{' ...' if len(loose) > 4 else ''}. It would cut them along their last "
            "dimension blindly (a packed attention in_proj_weight, a class token), and the pruned model could "
            "not be rebuilt from architecture.json. Keep q, k, v in an nn.Linear and declare the module's "
            "`prunable_heads` and `head_dim` (see compress/families/vision/models/vit.py), name parameters "
            "that fix a width in the model's `pinned_widths`, or ones that follow their layer's channels "
            "in `resizable_parameters`"
        )


def attention_heads(model: nn.Module) -> dict[nn.Linear, int]:
    """{packed q, k, v Linear: number of heads} of every module that declares `prunable_heads` and `head_dim`."""
    heads: dict[nn.Linear, int] = {}
    for name, module in model.named_modules():
        attr = getattr(module, "prunable_heads", None)
        if attr is None:
            continue
        qkv, head_dim = getattr(module, attr, None), getattr(module, "head_dim", None)
        if not isinstance(qkv, nn.Linear) or not isinstance(head_dim, int) or qkv.out_features % (3 * head_dim):
            raise StageError(
                f"prune: module '{name}' ({type(module).__name__}) declares prunable_heads = {attr!r}, but "
                f"'{attr}' is not an nn.Linear with 3 x heads x head_dim outputs (head_dim = {head_dim!r})"
            )
        heads[qkv] = qkv.out_features // (3 * head_dim)
    return heads


def _check_heads(heads: dict[nn.Linear, int], ratio: float) -> None:
    """`ratio` of every layer's heads, rounded up (torch-pruning's count), must leave at least one head."""
    if ratio == 0:
        return
    if not heads:
        raise StageError(
            f"prune.heads_ratio = {ratio}: the model has no attention whose heads can be pruned (a module "
            "declaring `prunable_heads` and `head_dim`, as the built-in ViTs do); remove heads_ratio"
        )
    for count in sorted(set(heads.values())):
        if math.ceil(ratio * count) >= count:
            raise StageError(
                f"prune.heads_ratio = {ratio}: of {count} heads, torch-pruning removes ceil({ratio} x {count}) = "
                f"{math.ceil(ratio * count)}, leaving none; use heads_ratio < {(count - 1) / count:.3f}"
            )


def _importance(options: PruneOptions):  # noqa: ANN202 - a torch_pruning Importance
    tp = _tp()
    if options.importance == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if options.importance == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if options.importance == "bn_scale":
        return tp.importance.BNScaleImportance()
    if options.importance == "taylor":
        return tp.importance.TaylorImportance()
    raise ValueError(
        f"prune.importance = {options.importance!r} is not available for vision models; "
        f"allowed: {', '.join(VISION_IMPORTANCES)}"
    )


def _accumulate_gradients(
    model: nn.Module,
    calib_batches: Iterable[tuple[Inputs, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    """Fill `.grad` for Taylor importance. Eval mode so BatchNorm running statistics stay untouched."""
    model.zero_grad(set_to_none=True)
    count = 0
    for inputs, labels in calib_batches:
        loss = loss_fn(model(*_as_tuple(inputs)), labels)
        loss.backward()
        count += 1
    if count == 0:
        raise StageError("prune: importance 'taylor' got an empty calib_batches")


def prune_vision(
    model: nn.Module,
    example_inputs: Inputs,
    options: PruneOptions,
    *,
    calib_batches: Sequence[tuple[Inputs, torch.Tensor]] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: ProgressFn | None = None,
) -> PruneReport:
    """Prune `model` in place to `options.target` and report params/MACs before and after.

    `calib_batches` (inputs, labels) and `loss_fn` (default cross-entropy) are needed for `taylor`
    importance only; gradients are recomputed before every pruning step. `heads_ratio` first removes that
    fraction of every attention layer's heads in one step. With a `macs` target the pruner then removes
    channels in `options.steps` increments up to `max_layer_ratio` (uniform) or that fraction of all
    channels (global) and stops at the first step that reaches the target (heads included); if none does,
    StageError. A model that cannot be pruned correctly is refused (StageError) before anything changes.
    """
    importance = _importance(options)
    if options.importance == "taylor" and not calib_batches:
        raise ValueError("prune.importance = 'taylor' needs calibration batches with labels; none were given")
    heads = attention_heads(model)
    _check_heads(heads, options.heads_ratio)
    _check_parameters(model)
    gradients = _gradient_fn(model, options, calib_batches, loss_fn or nn.functional.cross_entropy)
    was_training = model.training
    model.eval()  # tracing and counting must not update BatchNorm statistics
    try:
        keep = output_layers(model, example_inputs)
        ignored = _ignored_modules(model, options.ignored_layers, keep)
        widths_before = _layer_widths(model)
        tp_before, params_before = _torch_pruning_count(model, example_inputs)
        macs_before = count_macs(model, example_inputs)
        if options.target.macs is not None:  # a channels target is reported with our count, not steered by it
            _cross_check(macs_before, tp_before, model)
        if options.heads_ratio > 0:  # only the q, k, v layers are roots: every other group stays as it is
            layers = [m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
            others = [*ignored, *(m for m in layers if m not in heads)]
            pruner = _pruner(model, example_inputs, options, importance, others, ratio=options.heads_ratio, heads=heads)
            gradients()
            pruner.step()
        counts = _prune_channels(model, example_inputs, options, importance, [*ignored, *heads], gradients)
        done, macs_after, params_after = counts(macs_before, params_before, progress)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)

    widths_after = _layer_widths(model)
    layers = tuple(LayerChannels(name, widths_before[name], widths_after.get(name, 0)) for name in widths_before)
    return PruneReport(
        params_before=int(params_before),
        params_after=int(params_after),
        macs_before=int(macs_before),
        macs_after=int(macs_after),
        steps=done,
        layers=layers,
    )


def _gradient_fn(
    model: nn.Module,
    options: PruneOptions,
    calib_batches: Sequence[tuple[Inputs, torch.Tensor]] | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Callable[[], None]:
    """What to run before a pruning step: fill `.grad` for taylor importance, nothing for the others."""
    if options.importance != "taylor":
        return lambda: None
    return lambda: _accumulate_gradients(model, calib_batches or (), loss_fn)


def _pruner(
    model: nn.Module,
    example_inputs: Inputs,
    options: PruneOptions,
    importance: object,
    ignored: list[nn.Module],
    *,
    ratio: float,
    steps: int = 1,
    heads: dict[nn.Linear, int] | None = None,
):  # noqa: ANN202 - a torch_pruning BasePruner
    """torch-pruning's pruner; with `heads`, it removes `options.heads_ratio` of each one's heads (whole heads),
    per layer whatever the scope (a global ranking can take most heads of one layer and none of another).

    The layers coupled with a `pinned_widths` parameter are ignored: their widths stay.
    """
    tp = _tp()
    pinned = _pinned_parameters(model)
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs,
        importance=importance,
        global_pruning=options.scope == "global" and not heads,  # heads: the same fraction of every layer's
        pruning_ratio=ratio,
        max_pruning_ratio=options.max_layer_ratio,
        iterative_steps=steps,
        ignored_layers=ignored,
        round_to=options.round_to if options.round_to > 1 else None,
        unwrapped_parameters=[*_channel_parameters(model), *((p, p.dim() - 1) for p in pinned)],
        num_heads=dict(heads or {}),
        prune_num_heads=bool(heads),
        prune_head_dims=False,
        head_pruning_ratio=options.heads_ratio if heads else 0.0,
    )
    for param in pinned:  # every layer whose output channels are coupled with a pinned parameter keeps them
        group = pruner.DG.get_pruning_group(param, tp.prune_parameter_out_channels, [0])
        for dep, _ in group:
            if pruner.DG.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, nn.Module):
                pruner.ignored_layers.append(dep.target.module)
    return pruner


def _prune_channels(
    model: nn.Module,
    example_inputs: Inputs,
    options: PruneOptions,
    importance: object,
    ignored: list[nn.Module],
    gradients: Callable[[], None],
) -> Callable[[int, int, ProgressFn | None], tuple[int, int, int]]:
    """The channel steps toward `options.target`, as a function of the counts before any pruning."""
    target = options.target
    if target.channels is not None:
        ratio, steps = target.channels, 1
    else:
        ratio, steps = options.max_layer_ratio, options.steps
    pruner = _pruner(model, example_inputs, options, importance, ignored, ratio=ratio, steps=steps)

    def run(macs_before: int, params_before: int, progress: ProgressFn | None) -> tuple[int, int, int]:
        macs_after, params_after, done = count_macs(model, example_inputs), params_before, 0
        for step in range(1, steps + 1):
            if target.macs is not None and 1.0 - macs_after / macs_before >= target.macs:
                break  # heads alone reached it
            gradients()
            pruner.step()
            done = step
            tp_after, params_after = _torch_pruning_count(model, example_inputs)
            macs_after = count_macs(model, example_inputs)
            if target.macs is not None:
                _cross_check(macs_after, tp_after, model)
            if progress is not None:
                progress(step, steps, 1.0 - macs_after / macs_before)
        else:
            if target.macs is not None and 1.0 - macs_after / macs_before < target.macs:
                raise StageError(
                    f"prune: MACs target {target.macs:.3f} not reached; after {steps} steps the reduction is "
                    f"{1.0 - macs_after / macs_before:.3f}. Raise max_layer_ratio ({options.max_layer_ratio}), "
                    "use scope: global, or ignore fewer layers"
                )
        if done == 0:
            params_after = _torch_pruning_count(model, example_inputs)[1]
        return done, macs_after, params_after

    return run
