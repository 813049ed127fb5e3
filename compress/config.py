"""The pipeline file: schema and validation.

Everything is checked before any work starts: unknown keys, wrong types, unknown stages, a stage that
cannot follow the one before it, gates naming artifacts that do not exist, missing files. All problems
are reported at once, each as `file:line: key.path = value: what is allowed`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from compress.errors import ConfigError
from compress.families.base import links_source
from compress.paths import NAME_PATTERN
from compress.quant.vocab import AUTO, INT4_ALGORITHMS, INT8_METHODS, QUANT_PRECISIONS, TARGETS
from compress.registry import StageSpec, registered_adapters, registered_stages
from compress.schema import Count, PositiveCount, Real, Seed, Threads
from compress.stages.base import Ancestor, StageOptions
from compress.yamlsrc import KeyPath, Located, format_path, load_yaml

if TYPE_CHECKING:
    from compress.families.base import Adapter, QualityMetric

SOURCE = "source"  # name of the artifact the model source becomes


class SpeedupGate(BaseModel):
    """`artifact` must be at least `at_least` times faster than `vs` (p50 latency at `batch_size`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    artifact: str
    vs: str = Field("baseline", description="artifact to compare with; 'baseline' is the pipeline's baseline")
    at_least: Real = Field(gt=0)
    batch_size: Count = Field(1, gt=0)


class SizeGate(BaseModel):
    """`artifact`'s size on disk must be at most `at_most` times that of `vs`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    artifact: str
    vs: str = "baseline"
    at_most: Real = Field(gt=0)


class RecoveryGate(BaseModel):
    """`artifact` must win back at least `at_least` of the quality `lost_by` lost against the baseline.

    Quality is the family's primary metric (top-1 for vision, perplexity for causal-lm): recovery =
    (q(artifact) - q(lost_by)) / (q(baseline) - q(lost_by)), sign flipped where lower is better. E.g. a
    distillation after pruning.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    artifact: str
    lost_by: str
    at_least: Real = Field(gt=0, description="fraction of the loss won back: 0.5 is half")


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value


class Gates(BaseModel):
    """Bounds checked against the baseline; a breach fails the run with exit code 1.

    ```yaml
    gates:
      quality_drop_max: 0.5                                     # primary metric's unit, final artifacts
      # (vision: top-1 points, alias top1_drop_max; causal-lm: perplexity rise %, alias ppl_rise_max)
      speedup_min: [{artifact: int8, vs: onnx, at_least: 1.6}]  # p50 latency ratio
      size_ratio_max: {artifact: int8, vs: onnx, at_most: 0.3}
      recovery_min: {artifact: distill, lost_by: prune, at_least: 0.5}  # distillation wins back half
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    quality_drop_max: Real | None = Field(
        None, ge=0, description="how much worse than the baseline the family's primary metric may get, in its unit"
    )
    top1_drop_max: Real | None = Field(None, ge=0, description="vision's alias of quality_drop_max (top-1 points)")
    ppl_rise_max: Real | None = Field(None, ge=0, description="causal-lm's alias of quality_drop_max (perplexity %)")
    metric_gates_on: tuple[str, ...] | None = Field(
        None,
        description="artifacts quality_drop_max (or its alias) applies to ([] : none); default: the final artifact "
        "of every branch (an intermediate, e.g. a pruned model before distillation, is reported but not gated)",
    )
    speedup_min: tuple[SpeedupGate, ...] = ()
    decode_speedup_min: tuple[SpeedupGate, ...] = Field((), description="causal-lm: decode tokens/s ratio")
    size_ratio_max: tuple[SizeGate, ...] = ()
    recovery_min: tuple[RecoveryGate, ...] = Field((), description="quality won back after a lossy stage")

    _lists = field_validator("speedup_min", "decode_speedup_min", "size_ratio_max", "recovery_min", mode="before")(
        _as_list
    )

    def quality_bound(self) -> tuple[str, float] | None:
        """(the key written, its bound) of the quality gate: quality_drop_max or one family's alias."""
        return next(((k, v) for k in QUALITY_GATE_KEYS if (v := getattr(self, k)) is not None), None)


QUALITY_GATE_KEYS = ("quality_drop_max", "top1_drop_max", "ppl_rise_max")  # the generic gate, then its aliases


class BenchOptions(BaseModel):
    """How every artifact is timed. Each artifact is measured in its own process (peak RSS is per artifact)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    batch_sizes: tuple[PositiveCount, ...] = Field((1, 8), min_length=1, description="latency is measured at each")
    warmup: Count = Field(10, ge=0)
    iterations: Count = Field(100, gt=0)
    threads: Threads = Field(1, description="intra-op threads of every backend (same for all, for fairness)")
    enabled: bool = True
    prompt_lengths: tuple[PositiveCount, ...] = Field(
        (32, 128, 512), min_length=1, description="causal-lm: prefill lengths"
    )
    decode_tokens: Count = Field(32, gt=0, description="causal-lm: greedy decode steps timed per batch size")
    decode_prompt_lengths: tuple[PositiveCount, ...] = Field(
        (),
        description="causal-lm: also time batch-1 decode after a prompt of each length (decode tok/s vs prompt "
        "length); the 128-token context decode is always timed at is a point of it already",
    )
    onnx_providers: tuple[Literal["cpu", "cuda", "tensorrt"], ...] = Field(
        ("cpu",),
        min_length=1,
        description="ONNX Runtime execution providers for ONNX artifacts; evaluation and benchmarks use the "
        "first. cuda / tensorrt need the `gpu` extra (onnxruntime-gpu, never beside onnxruntime) and an NVIDIA "
        "GPU; the run fails before any work when the first is not available",
    )


class PipelineModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=NAME_PATTERN, description="run folder name")
    model: dict[str, Any]
    data: dict[str, Any]
    stages: list[Any] = Field(min_length=1)
    gates: Gates = Gates()
    bench: BenchOptions = BenchOptions()
    baseline: str | None = Field(None, description="artifact the gates compare with; default: finetune's, else source")
    seed: Seed = 0
    threads: Threads | None = Field(None, description="threads for training/evaluation; default: all cores")


@dataclass(frozen=True)
class StagePlan:
    index: int
    kind: str
    spec: StageSpec
    options: StageOptions
    name: str  # artifact it makes
    input: str  # artifact it starts from
    input_format: str
    output_format: str


@dataclass(frozen=True)
class PipelineConfig:
    file: Path
    name: str
    family: str
    quality: QualityMetric  # the family's declared primary metric: what quality gates bound
    model: BaseModel
    data: BaseModel
    stages: tuple[StagePlan, ...]
    gates: Gates
    bench: BenchOptions
    baseline: str
    seed: int
    threads: int
    resolved: dict[str, Any]  # the whole file after validation, defaults filled in
    warnings: tuple[str, ...] = ()  # shown by `validate` and `run`; they do not stop a run

    @property
    def base_dir(self) -> Path:
        return self.file.parent

    @property
    def final_artifacts(self) -> tuple[str, ...]:
        """Artifacts no later stage starts from: what each branch of the pipeline delivers."""
        used = {p.input for p in self.stages}
        return tuple(p.name for p in self.stages if p.name not in used)


class _Problems:
    def __init__(self, located: Located) -> None:
        self.located, self.items = located, []

    def add(self, path: Sequence[str | int], message: str, value: Any = None, show_value: bool = False) -> None:
        shown = f" = {value!r}" if show_value else ""
        self.items.append(f"{self.located.where(path)}: {format_path(path)}{shown}: {message}")

    def add_validation(self, prefix: KeyPath, exc: ValidationError, model: Any = None) -> None:
        errors = exc.errors()
        failed = {tuple(e["loc"][:-1]) for e in errors if e["loc"] and isinstance(e["loc"][-1], int)}
        for err in errors:
            if err["type"] == "too_short" and tuple(err["loc"]) in failed:
                continue  # `[0]` is too short only because its item failed, which is already said
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in _TAGS))
            path = (*prefix, *loc)
            if err["type"] == "extra_forbidden":
                allowed = _allowed_keys(model, loc[:-1])
                msg = "unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
                self.add(path, msg)
            elif err["type"] == "missing":
                self.add(path, "required key is missing")
            else:
                self.add(path, err["msg"], err.get("input"), show_value=True)

    def raise_if_any(self) -> None:
        if self.items:
            n = len(self.items)
            raise ConfigError(f"{n} problem{'s' if n > 1 else ''} in the pipeline file:\n  " + "\n  ".join(self.items))


#: discriminator tags pydantic puts in an error's location (not keys the user wrote)
_TAGS = {AUTO, *QUANT_PRECISIONS, *TARGETS, *INT4_ALGORITHMS, *INT8_METHODS, "function-after", "function-before"}


def _allowed_keys(model: Any, loc: tuple) -> list[str]:
    """Field names of the (nested) pydantic model at `loc`, for 'unknown key' messages."""
    if isinstance(model, TypeAdapter):
        return []
    cls = model
    for part in loc:
        if isinstance(part, int) or cls is None or not hasattr(cls, "model_fields") or part not in cls.model_fields:
            return []
        ann = cls.model_fields[part].annotation
        cls = next(
            (a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
    return sorted(cls.model_fields) if cls is not None and hasattr(cls, "model_fields") else []


def _validate(model: Any, data: Any) -> Any:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model.model_validate(data)
    return TypeAdapter(model).validate_python(data)


def load_pipeline(file: str | Path) -> PipelineConfig:
    """Read and validate a pipeline file; raise one ConfigError listing every problem."""
    located = load_yaml(file)
    problems = _Problems(located)
    top = _parse_top(file, located, problems)
    family, adapter_cls = _family_adapter(top, problems)
    model, data = _family_options(top, adapter_cls, problems)
    plans = _plan_stages(top.stages, family, adapter_cls, problems)
    names = {SOURCE, *(p.name for p in plans)}
    baseline = top.baseline or next((p.name for p in plans if p.kind == "finetune"), SOURCE)
    if baseline not in names:
        problems.add(("baseline",), f"no artifact of that name; artifacts: {', '.join(sorted(names))}", baseline, True)
    _check_lineages(plans, baseline, problems)
    if model is not None and links_source(model):
        _check_linked_source(plans, problems)
    _check_gate_names(top, names, problems)
    _check_family_gates(top.gates, family, adapter_cls, problems)
    if model is not None and data is not None:
        from compress.progress import Reporter

        probe = adapter_cls(
            model, data, base_dir=Path(file).parent, cache_dir=Path("cache"), reporter=Reporter(quiet=True)
        )
        for path, message in probe.preflight():
            problems.add(path, message)
    problems.raise_if_any()
    resolved = top.model_dump(mode="json")
    resolved.update(
        model=model.model_dump(mode="json"),
        data=data.model_dump(mode="json"),
        baseline=baseline,
        stages=[{p.kind: p.options.model_dump(mode="json")} for p in plans],
    )
    return PipelineConfig(
        file=Path(file),
        name=top.name,
        family=family,
        quality=adapter_cls.quality,
        model=model,
        data=data,
        stages=tuple(plans),
        gates=top.gates,
        bench=top.bench,
        baseline=baseline,
        seed=top.seed,
        threads=top.threads or os.cpu_count() or 1,
        resolved=resolved,
        warnings=tuple(_thread_warnings(located, top)),
    )


def _parse_top(file: str | Path, located: Located, problems: _Problems) -> PipelineModel:
    """The file's top-level keys, validated; the family's own blocks (model, data, stages) are still raw."""
    if not isinstance(located.data, dict):
        raise ConfigError(f"{file}: expected a mapping with name, model, data, stages")
    _refuse_empty_values(located, problems)
    problems.raise_if_any()
    try:
        return PipelineModel.model_validate(located.data)
    except ValidationError as exc:
        problems.add_validation((), exc, PipelineModel)
        problems.raise_if_any()
        raise  # unreachable


def _family_adapter(top: PipelineModel, problems: _Problems) -> tuple[str, type[Adapter]]:
    adapters = registered_adapters()
    family = top.model.get("family")
    if family not in adapters:
        allowed = ", ".join(sorted(adapters))
        problems.add(("model", "family"), f"unknown family; allowed: {allowed}", family, show_value=True)
        problems.raise_if_any()
    return family, adapters[family]


def _family_options(
    top: PipelineModel, adapter_cls: type[Adapter], problems: _Problems
) -> tuple[BaseModel | None, BaseModel | None]:
    """The `model` and `data` blocks validated by the family's own options types (None where invalid)."""
    out: list[BaseModel | None] = []
    for key, cls in (("model", adapter_cls.model_options), ("data", adapter_cls.data_options)):
        try:
            out.append(cls.model_validate(getattr(top, key)))
        except ValidationError as exc:
            problems.add_validation((key,), exc, cls)
            out.append(None)
    return out[0], out[1]


def _check_gate_names(top: PipelineModel, names: set[str], problems: _Problems) -> None:
    """Every artifact a gate names exists; a speed gate's batch size is one that is measured."""
    unknown = f"no artifact of that name; artifacts: {', '.join(sorted(names))}"
    for field in ("speedup_min", "decode_speedup_min", "size_ratio_max", "recovery_min"):
        for i, gate in enumerate(getattr(top.gates, field)):
            for attr in ("artifact", "lost_by") if field == "recovery_min" else ("artifact", "vs"):
                value = getattr(gate, attr)
                if value not in names and not (attr == "vs" and value == "baseline"):  # only `vs` may say baseline
                    problems.add(("gates", field, i, attr), unknown, value, True)
            if field in ("speedup_min", "decode_speedup_min") and gate.batch_size not in top.bench.batch_sizes:
                problems.add(
                    ("gates", field, i, "batch_size"),
                    f"not measured; bench.batch_sizes = {list(top.bench.batch_sizes)}",
                    gate.batch_size,
                    True,
                )
    for i, value in enumerate(top.gates.metric_gates_on or ()):
        if value not in names:
            problems.add(("gates", "metric_gates_on", i), unknown, value, True)


def _check_family_gates(gates: Gates, family: str, adapter_cls: type[Adapter], problems: _Problems) -> None:
    """Gates that only some families' declarations allow: decode speed, the quality gate's alias."""
    if not adapter_cls.measures_decode and gates.decode_speedup_min:
        decoders = ", ".join(name for name, cls in registered_adapters().items() if cls.measures_decode)
        problems.add(
            ("gates", "decode_speedup_min"), f"applies to families that decode ({decoders}) only; use speedup_min"
        )
    _check_quality_gate(gates, adapter_cls.quality.alias, family, problems)


def _check_quality_gate(gates: Gates, alias: str | None, family: str, problems: _Problems) -> None:
    """One quality bound: quality_drop_max, or the family's own alias of it; another family's alias is refused."""
    given = [k for k in QUALITY_GATE_KEYS if getattr(gates, k) is not None]
    for key in given[1:] if len(given) > 1 and given[0] == "quality_drop_max" else ():
        problems.add(("gates", key), "the same bound as quality_drop_max under another name; keep one of them")
    use = f"{alias} or quality_drop_max" if alias else "quality_drop_max"
    for key in given:
        if key != "quality_drop_max" and key != alias:
            problems.add(("gates", key), f"does not apply to family '{family}'; use {use}")


def _thread_warnings(located: Located, top: PipelineModel) -> list[str]:
    """More threads than cores is allowed (a shared machine, a later move) but slows everything down."""
    cores = os.cpu_count() or 1
    out = []
    for path, value in ((("threads",), top.threads), (("bench", "threads"), top.bench.threads)):
        if value is not None and value > cores:
            out.append(
                f"{located.where(path)}: {format_path(path)} = {value} is above this machine's {cores} cores; "
                "timings and training will be slower than with fewer threads"
            )
    return out


def _refuse_empty_values(located: Located, problems: _Problems) -> None:
    """`gates:` with nothing after it is a slip, not a choice: only a stage's options may be left empty."""
    for path in sorted(located.empty, key=lambda p: located.line(p) or 0):
        if len(path) == 3 and path[0] == "stages":
            continue  # `- export:` runs the stage with its defaults
        top = PipelineModel.model_fields.get(str(path[0])) if len(path) == 1 else None
        if top is not None and top.is_required():
            problems.add(path, "required, but the value is empty")
        else:
            problems.add(path, "the value is empty; write one (null where none is allowed), or remove the key")


def _check_lineages(plans: list[StagePlan], baseline: str, problems: _Problems) -> None:
    """What each stage can only see in its input's ancestry (e.g. distill's default teacher)."""
    by_name = {p.name: p for p in plans}
    earlier = {SOURCE: "torch"}
    for plan in plans:
        lineage, name = [], plan.input
        while name in by_name:
            lineage.append(Ancestor(name, by_name[name].kind, by_name[name].output_format))
            name = by_name[name].input
        lineage.append(Ancestor(SOURCE, SOURCE, "torch"))
        for key, message in plan.options.check_lineage(tuple(lineage), baseline, dict(earlier)):
            problems.add(("stages", plan.index, plan.kind, key), message)
        earlier[plan.name] = plan.output_format


def _check_linked_source(plans: list[StagePlan], problems: _Problems) -> None:
    """A linked source (`model.link: true`) is never loaded: only stages that stream its weight files read it."""
    for plan in plans:
        if SOURCE in (plan.input, *plan.options.extra_inputs()) and not plan.options.streams_weights:
            problems.add(
                ("stages", plan.index, plan.kind),
                "needs the float model in memory, which model.link: true never materialises; with a linked "
                "source use quantize {precision: int4, method: rtn | gptq | awq, target: onnxruntime-genai, "
                "streamed: true}, or remove model.link (the model is then loaded whole)",
            )


def _plan_stages(items: list[Any], family: str, adapter_cls: type[Adapter], problems: _Problems) -> list[StagePlan]:
    stages = registered_stages()
    plans: list[StagePlan] = []
    formats: dict[str, str | None] = {SOURCE: "torch"}
    precisions = {SOURCE: "fp32"}  # the precision chain: an int8 quantize of an int4 artifact is refused here
    previous = SOURCE
    for i, item in enumerate(items):
        plan = _plan_one(i, item, previous, (family, adapter_cls), stages, formats, problems)
        if plan is None:
            # Later stages that follow this one are not order-checked: it would only repeat this problem.
            previous = f"<stage {i}>"
            formats[previous] = None
            continue
        plans.append(plan)
        formats[plan.name] = plan.output_format
        precisions[plan.name] = plan.options.output_precision(precisions[plan.input])
        if problem := plan.options.input_precision_problem(plan.input, precisions[plan.input]):
            problems.add(("stages", i, plan.kind, "input"), problem, plan.input, True)
        previous = plan.name
    return plans


def _plan_one(
    i: int,
    item: Any,
    previous: str,
    family: tuple[str, type[Adapter]],
    stages: dict[str, StageSpec],
    formats: dict[str, str | None],
    problems: _Problems,
) -> StagePlan | None:
    path: KeyPath = ("stages", i)
    if not isinstance(item, dict) or len(item) != 1:
        problems.add(path, f"each stage is a mapping with one key, the stage kind; kinds: {', '.join(stages)}")
        return None
    kind, raw = next(iter(item.items()))
    if kind not in stages:
        problems.add(path, f"unknown stage '{kind}'; allowed: {', '.join(stages)}")
        return None
    spec = stages[kind]
    try:
        options = _validate(spec.options, raw if raw is not None else {})
    except ValidationError as exc:
        problems.add_validation((*path, kind), exc, spec.options)
        return None
    name = options.name or _default_name(kind, formats)
    known = [n for n in formats if not n.startswith("<")]
    if name == SOURCE:
        problems.add((*path, kind, "name"), "reserved for the artifact the model source becomes", name, True)
        return None
    if name in formats:
        problems.add((*path, kind, "name"), f"artifact name used twice; names so far: {', '.join(known)}", name, True)
        return None
    source = options.input or previous
    if source not in formats:
        problems.add(
            (*path, kind, "input"), f"no earlier artifact of that name; earlier: {', '.join(known)}", source, True
        )
        return None
    name_of_family, adapter_cls = family
    if kind not in adapter_cls.stage_kinds:
        takes = ", ".join(k for k in stages if k in adapter_cls.stage_kinds)
        problems.add((*path, kind), f"not available for family '{name_of_family}' (it takes: {takes})")
        return None
    fmt = formats[source]
    if fmt is None:
        return None
    plan_problems = options.check_family(adapter_cls)
    plan_problems += options.check_plan({n: f for n, f in formats.items() if f is not None})
    for key, message in plan_problems:
        problems.add((*path, kind, key), message, getattr(options, key, None), True)
    if plan_problems:
        return None
    if fmt not in options.accepts:
        hint = "; add an export stage before it" if "onnx" in options.accepts else ""
        problems.add(
            (*path, kind),
            f"cannot follow '{source}' ({fmt}): it starts from {' or '.join(sorted(options.accepts))}{hint}",
        )
        return None
    return StagePlan(i, kind, spec, options, name, source, fmt, options.output_format(fmt))


def _default_name(kind: str, taken: dict[str, str]) -> str:
    if kind not in taken:
        return kind
    n = 2
    while f"{kind}-{n}" in taken:
        n += 1
    return f"{kind}-{n}"
