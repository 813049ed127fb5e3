"""Gates: bounds on what each artifact lost or gained against the baseline.

Each gate ends in one of three states: `pass`, `fail` (measured and breached) or `not-checked` (it could
not be measured: evaluation or benchmarks were off, an artifact it names was skipped, a metric is
missing). A gate that was not checked is never counted as holding: see `verdict`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from compress.config import PipelineConfig, SizeGate, SpeedupGate
from compress.records import ArtifactRecord, GateRecord, Status, as_records

if TYPE_CHECKING:
    from compress.families.base import QualityMetric

Verdict = Literal["PASS", "FAIL", "INCOMPLETE"]
Records = Mapping[str, ArtifactRecord]
__all__ = ["Coverage", "Status", "Verdict", "check_gates", "verdict"]


@dataclass(frozen=True)
class Coverage:
    """What the run measured, so that a gate lacking a number can say why."""

    skipped: Mapping[str, str] = field(default_factory=dict)  # artifact -> why it was skipped
    evaluation_off: str | None = None  # why nothing was evaluated (e.g. "--no-eval"), None when evaluated
    bench_off: str | None = None  # why nothing was benchmarked, None when benchmarks ran


def verdict(gates: list[GateRecord]) -> Verdict:
    """FAIL if a checked gate is breached; PASS only if every gate was checked and holds; else INCOMPLETE."""
    if any(g.status == "fail" for g in gates):
        return "FAIL"
    return "INCOMPLETE" if any(g.status == "not-checked" for g in gates) else "PASS"


def _judged(gate: str, artifact: str, vs: str, value: float, bound: str, holds: bool, detail: str) -> GateRecord:
    return GateRecord(gate, artifact, vs, value, bound, "pass" if holds else "fail", detail)


def _unchecked(gate: str, artifact: str, vs: str, bound: str, reason: str) -> GateRecord:
    return GateRecord(gate, artifact, vs, None, bound, "not-checked", reason)


def _why_absent(name: str, records: Records, cov: Coverage) -> str | None:
    if name in cov.skipped:
        return f"'{name}' was skipped ({cov.skipped[name]})"
    if name not in records:
        return f"'{name}' was not built"
    return None


def _why_not_evaluated(names: list[str], records: Records, cov: Coverage) -> str | None:
    """Why one of `names` has no evaluation, or None when all have one."""
    for name in names:
        absent = _why_absent(name, records, cov)
        if absent:
            return absent
    if cov.evaluation_off and any(records[n].evaluation is None for n in names):
        return f"evaluation disabled ({cov.evaluation_off})"
    for name in names:
        if records[name].evaluation is None:
            return f"'{name}' is not evaluated ({_why_unmeasured(records[name])})"
    return None


def _why_unmeasured(record: ArtifactRecord) -> str:
    return record.artifact.get("unmeasured") or "its classifier head is untrained: no finetune before it"


def _why_not_benched(names: list[str], records: Records, cov: Coverage, what: str) -> str:
    for name in names:
        absent = _why_absent(name, records, cov)
        if absent:
            return absent
    unmeasured = [n for n in names if records[n].bench is None]
    if unmeasured and cov.bench_off:
        return f"benchmarks disabled ({cov.bench_off}) and no cached result for {', '.join(unmeasured)}"
    if unmeasured:
        return f"'{unmeasured[0]}' is not benchmarked ({_why_unmeasured(records[unmeasured[0]])})"
    return f"{what} not among the benchmark results (bench.batch_sizes)"


def check_gates(
    cfg: PipelineConfig,
    records: Mapping[str, ArtifactRecord | Mapping[str, Any]],
    coverage: Coverage | None = None,
) -> list[GateRecord]:
    """Every configured gate on the run's records (entries in manifest JSON form are read as records).

    Quality gates bound the family's declared primary metric (`cfg.quality`, the adapter's `QualityMetric`)."""
    cov, recs = coverage or Coverage(), as_records(records)
    base, gates = cfg.baseline, cfg.gates
    return [
        *_quality_gates(cfg, recs, cov),
        *(_decode_speedup(g, base, recs, cov) for g in gates.decode_speedup_min),
        *(_speedup(g, base, recs, cov) for g in gates.speedup_min),
        *(_size_ratio(g, base, recs, cov) for g in gates.size_ratio_max),
        *(_recovery(g.artifact, g.lost_by, g.at_least, base, recs, cfg.quality, cov) for g in gates.recovery_min),
        *_budget_gates(cfg, recs, cov),
    ]


def _budget_gates(cfg: PipelineConfig, recs: Records, cov: Coverage) -> list[GateRecord]:
    """One `accuracy_budget` gate per stage that declares one: the drop vs its float input on the evaluation
    set within the budget's `limit` (`max_drop`, `max_rise`), and the budget met on the calibration slice (else
    the best candidate fails it); the budget's `gate_detail` describes what the stage's search found."""
    quality, out = cfg.quality, []
    for plan in getattr(cfg, "stages", ()):  # a bare namespace (tests of other gates) has no stages
        budget = getattr(plan.options, "accuracy_budget", None)
        if budget is None:
            continue
        name, vs, bound = plan.name, plan.input, f"<= {budget.limit:g} {quality.unit}"
        why = _why_not_evaluated([name, vs], recs, cov)
        value = None if why else (recs[name].evaluation.vs_parent or {}).get(quality.drop_key)
        if why is None and value is None:
            why = f"metric '{quality.drop_key}' vs '{vs}' missing from the evaluation of '{name}'"
        if why is not None:
            out.append(_unchecked("accuracy_budget", name, vs, bound, why))
            continue
        found = recs[name].info.get("accuracy_budget") or {}
        holds = bool(found.get("met")) and value <= budget.limit
        out.append(_judged("accuracy_budget", name, vs, value, bound, holds, budget.gate_detail(found)))
    return out


def _decode_speedup(gate: SpeedupGate, base: str, recs: Records, cov: Coverage) -> GateRecord:
    vs = base if gate.vs == "baseline" else gate.vs
    a, b = _tps(recs.get(gate.artifact), gate.batch_size), _tps(recs.get(vs), gate.batch_size)
    bound = f">= {gate.at_least}x"
    if a is None or b is None:
        why = _why_not_benched([gate.artifact, vs], recs, cov, f"decode speed at batch {gate.batch_size}")
        return _unchecked("decode_speedup_min", gate.artifact, vs, bound, why)
    detail = f"decode at batch {gate.batch_size}: {a:.1f} vs {b:.1f} tokens/s"
    return _judged("decode_speedup_min", gate.artifact, vs, a / b, bound, a / b >= gate.at_least, detail)


def _speedup(gate: SpeedupGate, base: str, recs: Records, cov: Coverage) -> GateRecord:
    vs = base if gate.vs == "baseline" else gate.vs
    a, b = _p50(recs.get(gate.artifact), gate.batch_size), _p50(recs.get(vs), gate.batch_size)
    bound = f">= {gate.at_least}x"
    if a is None or b is None:
        why = _why_not_benched([gate.artifact, vs], recs, cov, f"latency at batch {gate.batch_size}")
        return _unchecked("speedup_min", gate.artifact, vs, bound, why)
    detail = f"p50 at batch {gate.batch_size}: {a:.2f} ms vs {b:.2f} ms"
    return _judged("speedup_min", gate.artifact, vs, b / a, bound, b / a >= gate.at_least, detail)


def _size_ratio(gate: SizeGate, base: str, recs: Records, cov: Coverage) -> GateRecord:
    vs = base if gate.vs == "baseline" else gate.vs
    bound = f"<= {gate.at_most}"
    absent = _why_absent(gate.artifact, recs, cov) or _why_absent(vs, recs, cov)
    if absent or not recs[gate.artifact].size_bytes or not recs[vs].size_bytes:
        return _unchecked("size_ratio_max", gate.artifact, vs, bound, absent or "artifact size unknown")
    a, b = recs[gate.artifact].size_bytes, recs[vs].size_bytes
    detail = f"{a / 1e6:.2f} MB vs {b / 1e6:.2f} MB"
    return _judged("size_ratio_max", gate.artifact, vs, a / b, bound, a / b <= gate.at_most, detail)


def _quality_gates(cfg: PipelineConfig, records: Records, cov: Coverage) -> list[GateRecord]:
    """quality_drop_max (or its alias) on every gated artifact (`metric_gates_on`, or each branch's end)."""
    given = cfg.gates.quality_bound()
    if given is None:
        return []
    key, bound = given  # the key written: quality_drop_max or the family's alias (config refuses another's)
    quality = cfg.quality
    base, on = cfg.baseline, cfg.gates.metric_gates_on  # on: [] gates nothing; None gates every branch's end
    if on is None:
        # What each branch delivers among the artifacts that exist (a skipped optional engine leaves its input
        # as the branch's last artifact).
        parents = {rec.parent for rec in records.values()}
        on = tuple(name for name in records if name not in parents)
    shown = f"<= {bound} {quality.unit}"
    out = []
    for name in dict.fromkeys(on):
        if name == base:
            continue
        why = _why_not_evaluated([name, base], records, cov)
        value = None if why else (records[name].evaluation.vs_baseline or {}).get(quality.drop_key)
        if why is None and value is None:
            why = f"metric '{quality.drop_key}' missing from the evaluation of '{name}'"
        if why is not None:
            out.append(_unchecked(key, name, base, shown, why))
            continue
        ours, theirs = records[name].metric(quality.name), records[base].metric(quality.name)
        detail = quality.detail.format(name=quality.name, ours=ours, theirs=theirs)
        out.append(_judged(key, name, base, value, shown, value <= bound, detail))
    return out


def _recovery(
    name: str,
    lost_by: str,
    at_least: float,
    base: str,
    records: Mapping[str, ArtifactRecord | Mapping[str, Any]],
    quality: QualityMetric,
    cov: Coverage | None = None,
) -> GateRecord:
    """Fraction of the quality `lost_by` lost vs `base` that `name` wins back, in the primary metric's direction."""
    recs, bound = as_records(records), f">= {at_least:g}"
    why = _why_not_evaluated([name, lost_by, base], recs, cov or Coverage())
    if why is not None:
        return _unchecked("recovery_min", name, lost_by, bound, why)
    metric = quality.name
    values = {k: recs[k].metric(metric) for k in (name, lost_by, base)}
    missing = [k for k, v in values.items() if v is None]
    if missing:
        return _unchecked("recovery_min", name, lost_by, bound, f"metric '{metric}' missing for {', '.join(missing)}")
    sign = 1.0 if quality.higher_is_better else -1.0
    q = {k: sign * v for k, v in values.items()}
    lost = q[base] - q[lost_by]
    detail = f"{metric}: {base} {values[base]:.2f}, {lost_by} {values[lost_by]:.2f}, {name} {values[name]:.2f}"
    if lost <= 0:
        return GateRecord("recovery_min", name, lost_by, None, bound, "pass", detail + f" ({lost_by} lost nothing)")
    recovered = (q[name] - q[lost_by]) / lost
    return _judged("recovery_min", name, lost_by, recovered, bound, recovered >= at_least, detail)


def _p50(record: ArtifactRecord | None, batch_size: int) -> float | None:
    return None if record is None or record.bench is None else record.bench.p50_ms(batch_size)


def _tps(record: ArtifactRecord | None, batch_size: int) -> float | None:
    return None if record is None or record.bench is None else record.bench.decode_tokens_per_s(batch_size)
