"""Build a TensorRT engine from an ONNX file (TensorRT 10.x Python API).

Written against the documented API (docs.nvidia.com/deeplearning/tensorrt, Python API: Builder,
INetworkDefinition, OnnxParser, IBuilderConfig, ITimingCache); `tensorrt` is imported only inside
`build_engine`. Not run in this project's CI (no GPU): the pure parts (build plan, parser-error
formatting, graph checks) are CPU-tested, the build itself by the `gpu`-marked test.

Precision:
- int8 / int4: the graph carries explicit Q/DQ (quantize stage, `target: tensorrt`); the network is
  created STRONGLY_TYPED so TensorRT follows the graph's types exactly and never picks precisions on
  its own. Layers outside Q/DQ run in the graph's float type (export in fp16 for fp16 elsewhere).
- fp16: weakly typed network with BuilderFlag.FP16 (TensorRT may choose fp16 kernels; builder flags
  for precision are not allowed on strongly typed networks).
- fp32: weakly typed, no precision flag.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import onnx

from compress.checks.tensorrt import assert_tensorrt_ready
from compress.errors import ConfigError, StageError
from compress.gpu.availability import import_tensorrt, require_gpu
from compress.gpu.profiles import Profile

Precision = Literal["fp16", "int8", "int4", "fp32"]
PRECISIONS: tuple[str, ...] = ("fp16", "int8", "int4", "fp32")


@dataclass(frozen=True)
class BuildPlan:
    """How a precision maps onto TensorRT network flags and builder flags."""

    precision: Precision
    strongly_typed: bool
    fp16_flag: bool


@dataclass(frozen=True)
class EngineInfo:
    """What was built, where, with which TensorRT on which GPU, and how long it took."""

    engine_path: str
    precision: Precision
    strongly_typed: bool
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    build_seconds: float
    engine_bytes: int
    profiles: tuple[Profile, ...] = field(default=())
    timing_cache_path: str | None = None


@dataclass(frozen=True)
class ParserErrorInfo:
    """One ONNX parser error, copied out of TensorRT's IParserError."""

    node_index: int
    node_name: str
    node_op: str
    code: str
    desc: str


def plan_build(precision: str) -> BuildPlan:
    """Network/builder flags for `precision`; ConfigError for anything else."""
    if precision not in PRECISIONS:
        raise ConfigError(f"engine precision = {precision!r}; allowed: {', '.join(PRECISIONS)}")
    explicit = precision in ("int8", "int4")
    return BuildPlan(precision, strongly_typed=explicit, fp16_flag=precision == "fp16")  # type: ignore[arg-type]


def check_graph_for_precision(model: onnx.ModelProto, precision: Precision, *, source: str = "") -> None:
    """Refuse a graph whose Q/DQ content contradicts `precision`, or that breaks TensorRT's rules.

    int8 needs QuantizeLinear/DequantizeLinear nodes; int4 needs an INT4 DequantizeLinear weight. A float
    graph asked to build as int8 would silently build as fp32 on a strongly typed network.
    """
    what = source or "the ONNX model"
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    if precision == "int8" and not dq:
        raise StageError(
            f"{what} has no Q/DQ nodes, so an int8 engine would run in float; quantize it first "
            "(quantize stage with `target: tensorrt`) or build with precision fp16"
        )
    if precision == "int4":
        int4 = {onnx.TensorProto.INT4}
        weights = {i.name: i.data_type for i in model.graph.initializer}
        if not any(weights.get(n.input[0]) in int4 for n in dq):
            raise StageError(
                f"{what} has no INT4 DequantizeLinear weight, so an int4 engine would not be 4-bit; "
                "quantize it first (quantize stage, precision int4, `target: tensorrt`)"
            )
    assert_tensorrt_ready(model, source=what)


def format_parser_errors(onnx_path: str, errors: Sequence[ParserErrorInfo]) -> str:
    """One line per parser error, naming the node index, name and op."""
    lines = [
        f"  - node #{e.node_index} '{e.node_name}' ({e.node_op}) [{e.code}]: {e.desc}"
        if e.node_index >= 0
        else f"  - graph [{e.code}]: {e.desc}"
        for e in errors
    ]
    return f"TensorRT could not parse {onnx_path}: {len(errors)} error(s)\n" + "\n".join(lines)


def gpu_name_and_capability(device: int = 0) -> tuple[str, str]:
    """GPU name and compute capability ("8.6"): torch.cuda when it sees a GPU, else nvidia-smi
    (`--query-gpu=name,compute_cap`), else ("unknown", "unknown")."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            return torch.cuda.get_device_name(device), f"{major}.{minor}"
    except ImportError:
        pass
    exe = shutil.which("nvidia-smi")
    if exe:
        out = subprocess.run(
            [exe, f"--id={device}", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        if out.returncode == 0 and "," in out.stdout:
            name, cap = (s.strip() for s in out.stdout.strip().splitlines()[0].rsplit(",", 1))
            return name, cap
    return "unknown", "unknown"


def _parser_errors(parser) -> list[ParserErrorInfo]:  # noqa: ANN001 - trt.OnnxParser
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        # node_name()/node_operator() exist from TensorRT 8.6 on; node() (index) since 8.0.
        name = err.node_name() if hasattr(err, "node_name") else ""
        op = err.node_operator() if hasattr(err, "node_operator") else ""
        errors.append(ParserErrorInfo(int(err.node()), name, op, str(err.code()), err.desc()))
    return errors


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    precision: Precision,
    profiles: Sequence[Profile] = (),
    workspace_mb: int = 4096,
    timing_cache_path: str | os.PathLike[str] | None = None,
) -> EngineInfo:
    """Parse `onnx_path`, build a serialized engine for `precision`, write it to `engine_path`.

    The engine is written to a temporary name then renamed; the timing cache (when given) is loaded
    before and saved after the build so later builds on the same GPU skip kernel timing.
    Raises ConfigError (bad arguments), StageError (graph refused, parser errors, build failure),
    MissingDependencyError (no `tensorrt`), GpuUnavailableError (no GPU).
    """
    plan = plan_build(precision)
    if workspace_mb <= 0:
        raise ConfigError(f"workspace_mb = {workspace_mb}; must be a positive number of MiB")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise ConfigError(f"ONNX file {onnx_path} does not exist")
    check_graph_for_precision(
        onnx.load(str(onnx_path), load_external_data=False), plan.precision, source=str(onnx_path)
    )

    trt = import_tensorrt(purpose="building TensorRT engines")
    require_gpu("building a TensorRT engine")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file
        raise StageError(format_parser_errors(str(onnx_path), _parser_errors(parser)))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb * (1 << 20))
    if plan.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    dynamic = [
        network.get_input(i).name for i in range(network.num_inputs) if any(d < 0 for d in network.get_input(i).shape)
    ]
    if dynamic and not profiles:
        raise ConfigError(
            f"inputs {dynamic} have dynamic dimensions; give optimisation profiles "
            "(compress.gpu.profiles.derive_profile(model, {'batch': (1, 8, 32)}))"
        )
    for prof in profiles:
        trt_profile = builder.create_optimization_profile()
        for r in prof.inputs:
            trt_profile.set_shape(r.name, r.min, r.opt, r.max)
        config.add_optimization_profile(trt_profile)

    cache_path = Path(timing_cache_path) if timing_cache_path else None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise StageError(
            f"TensorRT failed to build {onnx_path} at {precision}; see the TensorRT log above for the layer"
        )
    _write_atomic(engine_path, memoryview(serialized))
    if cache_path is not None:
        _write_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))

    name, capability = gpu_name_and_capability()
    return EngineInfo(
        engine_path=str(engine_path),
        precision=plan.precision,
        strongly_typed=plan.strongly_typed,
        tensorrt_version=trt.__version__,
        gpu_name=name,
        compute_capability=capability,
        build_seconds=seconds,
        engine_bytes=engine_path.stat().st_size,
        profiles=tuple(profiles),
        timing_cache_path=str(cache_path) if cache_path else None,
    )
