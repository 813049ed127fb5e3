"""`engine`: ONNX -> serialized TensorRT engine, for the GPU that builds it.

```yaml
- engine: {backend: tensorrt, precision: int8, input: int8-trt, optional: true, name: engine-int8}
- engine: {precision: fp16, input: onnx-fp32, profiles: {batch: [1, 16, 64]}, workspace_mb: 2048}
```

Order of work, cheapest and most likely to fail first, so a wrong graph is refused on any machine:
1. on CPU: the graph against the precision and TensorRT's Q/DQ rules (`check_graph_for_precision`:
   int8 needs Q/DQ nodes, int4 an INT4 weight; every rule breach names its node), then the
   optimisation profile from the adapter's `io_spec()` (below);
2. the `tensorrt` package (MissingDependencyError with `pip install 'compress[tensorrt]'`), then an
   NVIDIA GPU (GpuUnavailableError). With `optional: true` the runner records either as a skip with
   its reason; otherwise the run stops with exit 3;
3. the build (`compress.gpu.tensorrt_build.build_engine`): strongly typed for int8/int4, the FP16 flag
   for fp16. The engine only loads on the TensorRT version and GPU architecture that built it; both are
   recorded in the artifact's info.

Profiles. TensorRT needs min/opt/max shapes for every dynamic dimension (developer guide, "Working with
Dynamic Shapes"). `profiles` maps a symbolic dimension name of the adapter's `io_spec()` (or an ONNX
dim_param, or `input[axis]`) to `[min, opt, max]`; names not given get these defaults:
- `batch`: `[1, 8, max(32, data.batch_size)]`: opt 8 is the largest default `bench.batch_sizes`
  entry, max covers the evaluation batches. A pipeline that benchmarks above that max must give
  `profiles: {batch: [...]}` (the engine refuses larger inputs, naming its profile).
- `sequence`, `total_sequence` (causal-lm): `[1, min(128, window), window]`, `data.window` tokens.
  The stage is registered for vision only for now: the causal-lm adapter has no TensorRT session
  (KV-cache decoding), so an LLM engine could be built but neither evaluated nor benchmarked.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from compress.errors import StageError
from compress.registry import register_stage
from compress.schema import Count, PositiveCount
from compress.stages.base import StageContext, StageOptions, StageOutput

if TYPE_CHECKING:
    import onnx

    from compress.families.base import Adapter, IOSpec
    from compress.gpu.profiles import Profile

DEFAULT_OPT_BATCH = 8  # the largest entry of BenchOptions' default batch_sizes (1, 8)
DEFAULT_MAX_BATCH = 32
DEFAULT_OPT_SEQUENCE = 128


class EngineOptions(StageOptions):
    """Build a TensorRT engine from an ONNX artifact (needs the `tensorrt` extra and an NVIDIA GPU)."""

    accepts: ClassVar[frozenset[str]] = frozenset({"onnx"})
    backend: Literal["tensorrt"] = Field("tensorrt", description="engine builder; only TensorRT for now")
    precision: Literal["fp16", "int8", "int4", "fp32"] = Field(
        description="int8/int4: the input's Q/DQ (quantize with target: tensorrt), strongly typed; "
        "fp16: TensorRT may pick fp16 kernels; fp32: no reduced precision"
    )
    profiles: dict[str, tuple[PositiveCount, PositiveCount, PositiveCount]] | None = Field(
        None,
        description="dimension name -> [min, opt, max]; names not given get defaults from the adapter's "
        "io_spec (batch: [1, 8, max(32, data.batch_size)])",
    )
    workspace_mb: Count = Field(1024, gt=0, description="TensorRT builder workspace limit, MiB")
    timing_cache: str | None = Field(
        None,
        description="TensorRT timing cache file, kept between builds; default: a file per TensorRT "
        "version and GPU under the run cache (runs/.cache/tensorrt/)",
    )

    @field_validator("profiles")
    @classmethod
    def _ordered(cls, value: dict[str, tuple[int, int, int]] | None) -> dict[str, tuple[int, int, int]] | None:
        for name, (lo, opt, hi) in (value or {}).items():
            if not 1 <= lo <= opt <= hi:
                raise ValueError(f"{name}: [{lo}, {opt}, {hi}]; need 1 <= min <= opt <= max")
        return value

    def output_format(self, input_format: str) -> str:
        return "engine"

    def cache_fields(self) -> dict[str, Any]:
        # The timing cache speeds a build up; it does not change what is built.
        return self.model_dump(mode="json", exclude={"name", "input", "optional", "timing_cache"})


def default_dim_ranges(
    spec: IOSpec, *, max_batch: int = DEFAULT_MAX_BATCH, max_sequence: int | None = None
) -> dict[str, tuple[int, int, int]]:
    """Default [min, opt, max] for every symbolic dimension name of `spec`'s inputs (see module doc).

    A name with no default is left out: `resolve_profile` then names the input and dimension that needs
    a range in `profiles`.
    """
    names = {d for shape in spec.inputs.values() for d in shape if isinstance(d, str)}
    out: dict[str, tuple[int, int, int]] = {}
    for name in sorted(names):
        if name == "batch":
            out[name] = (1, DEFAULT_OPT_BATCH, max(DEFAULT_MAX_BATCH, max_batch, DEFAULT_OPT_BATCH))
        elif name in ("sequence", "total_sequence") and max_sequence is not None:
            out[name] = (1, min(DEFAULT_OPT_SEQUENCE, max_sequence), max_sequence)
    return out


def resolve_profile(
    model: onnx.ModelProto,
    spec: IOSpec,
    given: Mapping[str, tuple[int, int, int]],
    defaults: Mapping[str, tuple[int, int, int]],
) -> Profile:
    """The build's profile: io_spec names map to `input[axis]` keys, so the defaults hold whatever the
    exporter called the dimension (TorchScript keeps `batch`, dynamo may write `s0`).

    A given name that is not an io_spec name is passed through (an ONNX dim_param or `input[axis]`).
    Only axes that are dynamic in the ONNX file get a range: a static export needs none.
    """
    from compress.gpu.profiles import derive_profile

    ranges = {**defaults, **given}
    initializers = {i.name for i in model.graph.initializer}
    dynamic: set[str] = set()
    for vi in model.graph.input:
        if vi.name in initializers or not vi.type.tensor_type.HasField("shape"):
            continue
        for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
            if not (dim.HasField("dim_value") and dim.dim_value > 0):
                dynamic.add(f"{vi.name}[{axis}]")
    spec_names = {d for shape in spec.inputs.values() for d in shape if isinstance(d, str)}
    dynamic_names: set[str] = set()
    by_axis: dict[str, tuple[int, int, int]] = {}
    for input_name, shape in spec.inputs.items():
        for axis, dim in enumerate(shape):
            key = f"{input_name}[{axis}]"
            if isinstance(dim, str) and key in dynamic:
                dynamic_names.add(dim)
                if dim in ranges:
                    by_axis[key] = ranges[dim]
    static = sorted(k for k in given if k in spec_names and k not in dynamic_names)
    if static:
        raise StageError(
            f"engine profiles {static}: that dimension is static in the ONNX file "
            f"(dynamic axes: {sorted(dynamic) or 'none'})"
        )
    passthrough = {k: v for k, v in given.items() if k not in spec_names}
    return derive_profile(model, {**by_axis, **passthrough})


def adapter_defaults(adapter: Adapter) -> dict[str, tuple[int, int, int]]:
    """`default_dim_ranges` with the adapter's evaluation batch size and (causal-lm) window."""
    data = adapter.data_cfg
    return default_dim_ranges(
        adapter.io_spec(),
        max_batch=int(getattr(data, "batch_size", DEFAULT_MAX_BATCH)),
        max_sequence=getattr(data, "window", None),
    )


def _timing_cache_path(options: EngineOptions, adapter: Adapter, trt_version: str, capability: str) -> Path:
    if options.timing_cache is not None:
        return Path(options.timing_cache)
    # A timing cache is valid for one TensorRT version and GPU architecture: one file each.
    return Path(adapter.cache_dir) / "tensorrt" / f"timing-trt{trt_version}-sm{capability.replace('.', '')}.cache"


@register_stage("engine", options=EngineOptions)
def engine(artifact, options: EngineOptions, ctx: StageContext) -> StageOutput:
    """Build a TensorRT engine (after CPU checks of the graph and the profile)."""
    import onnx

    from compress.gpu.availability import import_tensorrt, require_gpu
    from compress.gpu.tensorrt_build import build_engine, check_graph_for_precision, gpu_name_and_capability

    source = f"engine ← {artifact.name} ({artifact.main})"
    model = onnx.load(str(artifact.main), load_external_data=False)
    check_graph_for_precision(model, options.precision, source=source)  # StageError naming the node
    profile = resolve_profile(model, ctx.adapter.io_spec(), options.profiles or {}, adapter_defaults(ctx.adapter))
    shapes = ", ".join(f"{r.name} {r.min}..{r.opt}..{r.max}" for r in profile.inputs)
    ctx.reporter.log(f"  CPU checks passed (TensorRT Q/DQ rules, {options.precision}); profile: {shapes}")

    trt = import_tensorrt(purpose=f"building the TensorRT engine '{options.name or 'engine'}'")
    require_gpu("building a TensorRT engine")
    _, capability = gpu_name_and_capability()
    cache = _timing_cache_path(options, ctx.adapter, trt.__version__, capability)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with ctx.reporter.task(f"TensorRT build ({options.precision})", total=None):
        info = build_engine(
            artifact.main,
            ctx.outdir / "model.engine",
            precision=options.precision,
            profiles=[profile],
            workspace_mb=options.workspace_mb,
            timing_cache_path=cache,
        )
    ctx.reporter.log(f"  engine built in {info.build_seconds:.1f} s on {info.gpu_name} (sm {info.compute_capability})")
    return StageOutput(
        file="model.engine",
        format="engine",
        precision=options.precision,
        target="tensorrt",
        info={
            "backend": "tensorrt",
            "tensorrt_version": info.tensorrt_version,
            "gpu_name": info.gpu_name,
            "compute_capability": info.compute_capability,
            "build_seconds": round(info.build_seconds, 1),
            "engine_bytes": info.engine_bytes,
            "strongly_typed": info.strongly_typed,
            "profiles": [
                {r.name: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for r in p.inputs}
                for p in info.profiles
            ],
            "timing_cache": info.timing_cache_path,
        },
    )
