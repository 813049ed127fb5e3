"""Typed records of a run: what manifest.json holds per artifact (the artifact, its evaluation, its benchmark)
and per gate. The only module that knows the manifest's shape: the runner writes these records, the gates and
the report read them, and `from_json` still reads manifests written before these types existed.

The `artifact` part of an entry is the artifact's own JSON (`compress.artifact.Artifact.to_json`, what
artifact.json holds): artifact.py owns that shape, so it is kept as written and read through properties.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from compress.artifact import Artifact

Status = Literal["pass", "fail", "not-checked"]


def _frozen(data: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(data or {}))


@dataclass(frozen=True)
class EvaluationRecord:
    """An artifact's metrics, and the adapter's comparisons with the baseline and with its parent."""

    metrics: Mapping[str, float]
    vs_baseline: Mapping[str, float] | None = None  # None: it is the baseline, or the baseline is not evaluated
    vs_parent: Mapping[str, float] | None = None  # None: its parent is not evaluated

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metrics": dict(self.metrics)}
        for key in ("vs_baseline", "vs_parent"):
            if getattr(self, key) is not None:
                out[key] = dict(getattr(self, key))
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvaluationRecord:
        return cls(
            metrics=_frozen(data.get("metrics")),
            vs_baseline=None if data.get("vs_baseline") is None else _frozen(data["vs_baseline"]),
            vs_parent=None if data.get("vs_parent") is None else _frozen(data["vs_parent"]),
        )


@dataclass(frozen=True)
class LatencyRow:
    batch_size: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float  # items per second
    extra: Mapping[str, Any] = field(default_factory=dict)  # whatever else the harness measured, kept as is

    _KEYS = ("batch_size", "p50_ms", "p90_ms", "p99_ms", "throughput")

    def to_json(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self._KEYS}, **self.extra}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LatencyRow:
        extra = {k: v for k, v in data.items() if k not in cls._KEYS}
        return cls(**{k: data[k] for k in cls._KEYS}, extra=_frozen(extra))


@dataclass(frozen=True)
class BenchRecord:
    """What the benchmark worker measured on one artifact (`llm`: causal-lm prefill/decode block)."""

    latency: tuple[LatencyRow, ...]
    backend: str
    threads: int | None
    peak_rss_mb: float
    llm: Mapping[str, Any] | None = None
    measured: str | None = None  # ISO time of the measurement; None in results from before it was recorded
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = ("latency", "backend", "threads", "peak_rss_mb", "llm", "measured")

    def p50_ms(self, batch_size: int) -> float | None:
        return next((row.p50_ms for row in self.latency if row.batch_size == batch_size), None)

    def decode_tokens_per_s(self, batch_size: int) -> float | None:
        rates = (self.llm or {}).get("decode_tokens_per_s", {})
        rates = {int(k): v for k, v in rates.items()}  # JSON turns int keys into strings
        return float(rates[batch_size]) if batch_size in rates else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "latency": [row.to_json() for row in self.latency],
            "backend": self.backend,
            "threads": self.threads,
            "peak_rss_mb": self.peak_rss_mb,
        }
        if self.llm is not None:
            out["llm"] = dict(self.llm)
        if self.measured is not None:
            out["measured"] = self.measured
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchRecord:
        return cls(
            latency=tuple(LatencyRow.from_json(row) for row in data["latency"]),
            backend=data["backend"],
            threads=data.get("threads"),
            peak_rss_mb=data["peak_rss_mb"],
            llm=data.get("llm"),
            measured=data.get("measured"),
            extra=_frozen({k: v for k, v in data.items() if k not in cls._KEYS}),
        )


@dataclass(frozen=True)
class ArtifactRecord:
    """One entry of manifest.json's `artifacts`.

    `evaluation` is None both when the evaluation pass did not run (the key is absent from the manifest) and
    when it skipped this artifact (untrained head: the key holds null); `evaluated` tells them apart.
    """

    artifact: Mapping[str, Any]  # Artifact.to_json()
    cached: bool
    size_bytes: int
    evaluation: EvaluationRecord | None = None
    evaluated: bool = False
    bench: BenchRecord | None = None
    # peak RSS of the work done for it in this run, by part ("stage", "evaluation"): compress.memory.PeakRecord
    # JSON; a part absent from it was a cache hit (or did not run)
    memory: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, art: Artifact, *, cached: bool) -> ArtifactRecord:
        return cls(artifact=_frozen(art.to_json()), cached=cached, size_bytes=art.size_bytes)

    @property
    def name(self) -> str:
        return self.artifact["name"]

    @property
    def parent(self) -> str | None:
        return self.artifact.get("parent")

    @property
    def info(self) -> Mapping[str, Any]:
        return self.artifact.get("info") or {}

    def metric(self, name: str) -> float | None:
        return None if self.evaluation is None else self.evaluation.metrics.get(name)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"artifact": dict(self.artifact), "cached": self.cached, "size_bytes": self.size_bytes}
        if self.evaluated:
            out["evaluation"] = None if self.evaluation is None else self.evaluation.to_json()
        if self.bench is not None:
            out["bench"] = self.bench.to_json()
        if self.memory:
            out["memory"] = {part: dict(peak) for part, peak in self.memory.items()}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ArtifactRecord:
        evaluation, bench = data.get("evaluation"), data.get("bench")
        artifact = data.get("artifact") or {}
        return cls(
            artifact=_frozen(artifact),
            cached=bool(data.get("cached", False)),
            size_bytes=int(data.get("size_bytes", artifact.get("size_bytes", 0))),
            evaluation=None if not evaluation else EvaluationRecord.from_json(evaluation),
            evaluated="evaluation" in data,
            bench=None if not bench else BenchRecord.from_json(bench),
            memory=_frozen(data.get("memory")),
        )


@dataclass(frozen=True)
class GateRecord:
    """One gate's outcome. `not-checked`: it could not be measured, and is never counted as holding."""

    gate: str
    artifact: str
    vs: str
    value: float | None
    bound: str
    status: Status
    detail: str  # what was compared, or why the gate could not be checked

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def to_json(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "artifact": self.artifact,
            "vs": self.vs,
            "value": self.value,
            "bound": self.bound,
            "status": self.status,
            "detail": self.detail,
            "passed": self.passed,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GateRecord:
        """Manifests written before gates had a status only say `passed`."""
        status = data.get("status") or ("pass" if data["passed"] else "fail")
        keys = ("gate", "artifact", "vs", "value", "bound", "detail")
        return cls(**{k: data[k] for k in keys}, status=status)


def as_records(records: Mapping[str, ArtifactRecord | Mapping[str, Any]]) -> dict[str, ArtifactRecord]:
    """Records by artifact name; entries still in their manifest JSON form are read with `from_json`."""
    return {n: r if isinstance(r, ArtifactRecord) else ArtifactRecord.from_json(r) for n, r in records.items()}


@dataclass(frozen=True)
class Comparison:
    """One of the adapter's `compare()` keys as the report shows it (`sign` is applied for display)."""

    key: str
    label: str
    sign: int

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "sign": self.sign}


@dataclass(frozen=True)
class RunManifest:
    """manifest.json of a finished run: what was built and measured, the gates and the verdict."""

    compress_version: str
    created: str
    pipeline: Mapping[str, Any]  # name, file, family
    baseline: str
    metric_names: tuple[str, ...]
    comparisons: tuple[Comparison, ...]
    artifacts: tuple[ArtifactRecord, ...]
    gates: tuple[GateRecord, ...]
    verdict: str | None  # PASS | FAIL | INCOMPLETE; None while a run is under way or after it crashed
    notes: tuple[str, ...] = ()
    data: Mapping[str, str] = field(default_factory=dict)  # data role -> sha256
    machine: Mapping[str, Any] | None = None
    bench_settings: Mapping[str, Any] = field(default_factory=dict)
    skipped: tuple[Mapping[str, str], ...] = ()  # {stage, artifact, reason}
    run: Mapping[str, Any] | None = None  # {state, step, error}

    def record(self, name: str) -> ArtifactRecord | None:
        return next((r for r in self.artifacts if r.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "compress_version": self.compress_version,
            "created": self.created,
            "pipeline": dict(self.pipeline),
            "baseline": self.baseline,
            "notes": list(self.notes),
            "metric_names": list(self.metric_names),
            "comparisons": [c.to_json() for c in self.comparisons],
            "data": dict(self.data),
            "machine": None if self.machine is None else dict(self.machine),
            "bench_settings": dict(self.bench_settings),
            "artifacts": [r.to_json() for r in self.artifacts],
            "skipped": [dict(s) for s in self.skipped],
            "gates": [g.to_json() for g in self.gates],
            "verdict": self.verdict,
            "passed": self.verdict == "PASS",
            "run": None if self.run is None else dict(self.run),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunManifest:
        """Also reads manifests of older versions (no verdict: only `passed`; no notes, no run state)."""
        verdict = data["verdict"] if "verdict" in data else ("PASS" if data.get("passed") else "FAIL")
        return cls(
            compress_version=data.get("compress_version", "?"),
            created=data.get("created", "?"),
            pipeline=_frozen(data["pipeline"]),
            baseline=data["baseline"],
            metric_names=tuple(data["metric_names"]),
            comparisons=tuple(Comparison(c["key"], c["label"], c["sign"]) for c in data["comparisons"]),
            artifacts=tuple(ArtifactRecord.from_json(entry) for entry in data["artifacts"]),
            gates=tuple(GateRecord.from_json(g) for g in data.get("gates") or []),
            verdict=verdict,
            notes=tuple(data.get("notes") or ()),
            data=_frozen(data.get("data")),
            machine=data.get("machine"),
            bench_settings=_frozen(data.get("bench_settings")),
            skipped=tuple(data.get("skipped") or ()),
            run=data.get("run"),
        )
