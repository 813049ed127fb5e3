"""TensorRT optimisation profiles (min/opt/max shape per input) derived from an ONNX model's inputs.

TensorRT needs, for every input with a dynamic dimension, the smallest, typical and largest shape it
will see (developer guide, "Working with Dynamic Shapes" / optimization profiles). The ONNX export
names its dynamic dimensions (`dynamic_axes={"x": {0: "batch"}}`), so the user gives one range per
name, e.g. ``{"batch": (1, 8, 32), "sequence": (1, 128, 2048)}``, and every input sharing a name gets
the same range. An unnamed dynamic dimension can be given as ``"input_name[axis]"``.

Pure Python over the ONNX protobuf: runs and is tested on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from compress.errors import ConfigError

DimRange = tuple[int, int, int]


@dataclass(frozen=True)
class ShapeRange:
    """min/opt/max shape of one input; TensorRT tunes kernels for `opt` and accepts [min, max]."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimisation profile: a ShapeRange for every input of the network."""

    inputs: tuple[ShapeRange, ...]

    def as_dict(self) -> dict[str, ShapeRange]:
        return {r.name: r for r in self.inputs}

    def trtexec_args(self) -> list[str]:
        """`--minShapes/--optShapes/--maxShapes` arguments, for reproducing a build with trtexec."""

        def fmt(attr: str) -> str:
            return ",".join(f"{r.name}:{'x'.join(map(str, getattr(r, attr)))}" for r in self.inputs)

        return [f"--minShapes={fmt('min')}", f"--optShapes={fmt('opt')}", f"--maxShapes={fmt('max')}"]

    def ort_tensorrt_options(self) -> dict[str, str]:
        """ONNX Runtime TensorRT EP `trt_profile_{min,opt,max}_shapes` options for this profile."""
        args = self.trtexec_args()
        return {
            "trt_profile_min_shapes": args[0].split("=", 1)[1],
            "trt_profile_opt_shapes": args[1].split("=", 1)[1],
            "trt_profile_max_shapes": args[2].split("=", 1)[1],
        }


def _load(model: onnx.ModelProto | str | os.PathLike[str]) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(Path(model)), load_external_data=False)


def _check_range(key: str, value: object) -> DimRange:
    ok = (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
    if not ok:
        raise ConfigError(f"profile range for '{key}' = {value!r}; expected three integers (min, opt, max)")
    lo, opt, hi = value  # type: ignore[misc]
    if not 1 <= lo <= opt <= hi:
        raise ConfigError(f"profile range for '{key}' = {tuple(value)}; need 1 <= min <= opt <= max")
    return lo, opt, hi


def derive_profile(model: onnx.ModelProto | str | os.PathLike[str], dim_ranges: Mapping[str, Sequence[int]]) -> Profile:
    """One Profile from the model's graph inputs (initializers listed as inputs are skipped).

    Raises ConfigError naming the input and dimension when a dynamic dimension has no range, and naming
    the key when a given range matches no dimension of any input (a typo would otherwise be ignored).
    """
    m = _load(model)
    ranges = {k: _check_range(k, v) for k, v in dim_ranges.items()}
    used: set[str] = set()
    initializers = {i.name for i in m.graph.initializer}
    out: list[ShapeRange] = []
    for vi in m.graph.input:
        if vi.name in initializers:
            continue
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            raise ConfigError(f"input '{vi.name}' has no static rank; re-export with a known input rank")
        lo: list[int] = []
        opt: list[int] = []
        hi: list[int] = []
        for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                for shape in (lo, opt, hi):
                    shape.append(dim.dim_value)
                continue
            by_axis = f"{vi.name}[{axis}]"
            key = by_axis if by_axis in ranges else dim.dim_param
            if not key or key not in ranges:
                named = f"'{dim.dim_param}'" if dim.dim_param else "(unnamed)"
                raise ConfigError(
                    f"input '{vi.name}' dimension {axis} {named} is dynamic but has no profile range; "
                    f"give one as {{'{dim.dim_param or by_axis}': (min, opt, max)}} "
                    f"(ranges given: {sorted(ranges) or 'none'})"
                )
            used.add(key)
            r = ranges[key]
            lo.append(r[0])
            opt.append(r[1])
            hi.append(r[2])
        out.append(ShapeRange(vi.name, tuple(lo), tuple(opt), tuple(hi)))
    unused = sorted(set(ranges) - used)
    if unused:
        raise ConfigError(
            f"profile ranges {unused} match no dynamic dimension of the model's inputs "
            f"({', '.join(_describe(m, initializers)) or 'no inputs'})"
        )
    return Profile(tuple(out))


def derive_profiles(
    model: onnx.ModelProto | str | os.PathLike[str], ranges: Sequence[Mapping[str, Sequence[int]]]
) -> list[Profile]:
    """One Profile per mapping (TensorRT picks a profile per execution context)."""
    if not ranges:
        raise ConfigError("at least one profile range mapping is needed, e.g. [{'batch': (1, 8, 32)}]")
    m = _load(model)
    return [derive_profile(m, r) for r in ranges]


def _describe(m: onnx.ModelProto, initializers: set[str]) -> list[str]:
    parts = []
    for vi in m.graph.input:
        if vi.name in initializers or not vi.type.HasField("tensor_type"):
            continue
        dims = [d.dim_param or (str(d.dim_value) if d.dim_value else "?") for d in vi.type.tensor_type.shape.dim]
        parts.append(f"{vi.name}[{', '.join(dims)}]")
    return parts
