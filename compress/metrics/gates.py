"""Gates: bounds on what each artifact lost or gained against the baseline.

Each gate ends in one of three states: `pass`, `fail` (measured and breached) or `not-checked` (it could
not be measured: evaluation or benchmarks were off, an artifact it names was skipped, a metric is
missing). A gate that was not checked is never counted as holding: see `verdict`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from compress.config import PipelineConfig

Status = Literal["pass", "fail", "not-checked"]
Verdict = Literal["PASS", "FAIL", "INCOMPLETE"]


@dataclass(frozen=True)
class GateResult:
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
        return {**asdict(self), "passed": self.passed}


@dataclass(frozen=True)
class Coverage:
    """What the run measured, so that a gate lacking a number can say why."""

    skipped: Mapping[str, str] = field(default_factory=dict)  # artifact -> why it was skipped
    evaluation_off: str | None = None  # why nothing was evaluated (e.g. "--no-eval"), None when evaluated
    bench_off: str | None = None  # why nothing was benchmarked, None when benchmarks ran


def verdict(gates: list[GateResult]) -> Verdict:
    """FAIL if a checked gate is breached; PASS only if every gate was checked and holds; else INCOMPLETE."""
    if any(g.status == "fail" for g in gates):
        return "FAIL"
    return "INCOMPLETE" if any(g.status == "not-checked" for g in gates) else "PASS"


def _judged(gate: str, artifact: str, vs: str, value: float, bound: str, holds: bool, detail: str) -> GateResult:
    return GateResult(gate, artifact, vs, value, bound, "pass" if holds else "fail", detail)


def _unchecked(gate: str, artifact: str, vs: str, bound: str, reason: str) -> GateResult:
    return GateResult(gate, artifact, vs, None, bound, "not-checked", reason)


def _why_absent(name: str, records: Mapping[str, dict[str, Any]], cov: Coverage) -> str | None:
    if name in cov.skipped:
        return f"'{name}' was skipped ({cov.skipped[name]})"
    if name not in records:
        return f"'{name}' was not built"
    return None


def _why_not_evaluated(names: list[str], records: Mapping[str, dict[str, Any]], cov: Coverage) -> str | None:
    """Why one of `names` has no evaluation, or None when all have one."""
    for name in names:
        absent = _why_absent(name, records, cov)
        if absent:
            return absent
    if cov.evaluation_off and any(not records[n].get("evaluation") for n in names):
        return f"evaluation disabled ({cov.evaluation_off})"
    for name in names:
        if not records[name].get("evaluation"):
            return f"'{name}' is not evaluated (its classifier head is untrained: no finetune before it)"
    return None


def _why_not_benched(names: list[str], records: Mapping[str, dict[str, Any]], cov: Coverage, what: str) -> str:
    for name in names:
        absent = _why_absent(name, records, cov)
        if absent:
            return absent
    unmeasured = [n for n in names if not records[n].get("bench")]
    if unmeasured and cov.bench_off:
        return f"benchmarks disabled ({cov.bench_off}) and no cached result for {', '.join(unmeasured)}"
    if unmeasured:
        return f"'{unmeasured[0]}' is not benchmarked (its classifier head is untrained: no finetune before it)"
    return f"{what} not among the benchmark results (bench.batch_sizes)"


def check_gates(
    cfg: PipelineConfig, records: Mapping[str, dict[str, Any]], coverage: Coverage | None = None
) -> list[GateResult]:
    """`records[name]` holds an artifact's `evaluation` (with `vs_baseline`), `bench` and `size_bytes`."""
    cov = coverage or Coverage()
    out = _metric_gates(cfg, records, cov)
    base = cfg.baseline
    for gate in cfg.gates.decode_speedup_min:
        vs = base if gate.vs == "baseline" else gate.vs
        a, b = _tps(records.get(gate.artifact), gate.batch_size), _tps(records.get(vs), gate.batch_size)
        bound = f">= {gate.at_least}x"
        if a is None or b is None:
            why = _why_not_benched([gate.artifact, vs], records, cov, f"decode speed at batch {gate.batch_size}")
            out.append(_unchecked("decode_speedup_min", gate.artifact, vs, bound, why))
            continue
        detail = f"decode at batch {gate.batch_size}: {a:.1f} vs {b:.1f} tokens/s"
        out.append(_judged("decode_speedup_min", gate.artifact, vs, a / b, bound, a / b >= gate.at_least, detail))
    for gate in cfg.gates.speedup_min:
        vs = base if gate.vs == "baseline" else gate.vs
        a, b = _p50(records.get(gate.artifact), gate.batch_size), _p50(records.get(vs), gate.batch_size)
        bound = f">= {gate.at_least}x"
        if a is None or b is None:
            why = _why_not_benched([gate.artifact, vs], records, cov, f"latency at batch {gate.batch_size}")
            out.append(_unchecked("speedup_min", gate.artifact, vs, bound, why))
            continue
        detail = f"p50 at batch {gate.batch_size}: {a:.2f} ms vs {b:.2f} ms"
        out.append(_judged("speedup_min", gate.artifact, vs, b / a, bound, b / a >= gate.at_least, detail))
    for gate in cfg.gates.size_ratio_max:
        vs = base if gate.vs == "baseline" else gate.vs
        bound = f"<= {gate.at_most}"
        absent = _why_absent(gate.artifact, records, cov) or _why_absent(vs, records, cov)
        a, b = records.get(gate.artifact, {}).get("size_bytes"), records.get(vs, {}).get("size_bytes")
        if absent or not a or not b:
            out.append(_unchecked("size_ratio_max", gate.artifact, vs, bound, absent or "artifact size unknown"))
            continue
        detail = f"{a / 1e6:.2f} MB vs {b / 1e6:.2f} MB"
        out.append(_judged("size_ratio_max", gate.artifact, vs, a / b, bound, a / b <= gate.at_most, detail))
    for gate in cfg.gates.recovery_min:
        out.append(_recovery(gate.artifact, gate.lost_by, gate.at_least, base, records, cov))
    return out


_METRIC_GATES = (  # key, metric, change vs baseline, unit, detail
    ("top1_drop_max", "top1", "top1_drop", "points", "top-1 {:.2f}% vs {:.2f}%"),
    ("ppl_rise_max", "ppl", "ppl_rise_pct", "%", "perplexity {:.3f} vs {:.3f}"),
)


def _metric_gates(cfg: PipelineConfig, records: Mapping[str, dict[str, Any]], cov: Coverage) -> list[GateResult]:
    """top1_drop_max / ppl_rise_max on every gated artifact (`metric_gates_on`, or each branch's end)."""
    base, on = cfg.baseline, cfg.gates.metric_gates_on  # on: [] gates nothing; None gates every branch's end
    if on is None:
        # What each branch delivers among the artifacts that exist (a skipped optional engine leaves its input
        # as the branch's last artifact).
        parents = {rec["artifact"]["parent"] for rec in records.values()}
        on = tuple(name for name in records if name not in parents)
    out = []
    for key, metric, change, unit, detail in _METRIC_GATES:
        bound = getattr(cfg.gates, key)
        if bound is None:
            continue
        for name in dict.fromkeys(on):
            if name == base:
                continue
            why = _why_not_evaluated([name, base], records, cov)
            value = None if why else records[name]["evaluation"].get("vs_baseline", {}).get(change)
            if why is None and value is None:
                why = f"metric '{change}' missing from the evaluation of '{name}'"
            if why is not None:
                out.append(_unchecked(key, name, base, f"<= {bound} {unit}", why))
                continue
            ours, theirs = (records[n]["evaluation"]["metrics"][metric] for n in (name, base))
            out.append(
                _judged(key, name, base, value, f"<= {bound} {unit}", value <= bound, detail.format(ours, theirs))
            )
    return out


def _recovery(
    name: str,
    lost_by: str,
    at_least: float,
    base: str,
    records: Mapping[str, dict[str, Any]],
    cov: Coverage | None = None,
) -> GateResult:
    """Fraction of the quality `lost_by` lost vs `base` that `name` wins back (top-1, or perplexity's drop)."""
    bound = f">= {at_least:g}"
    why = _why_not_evaluated([name, lost_by, base], records, cov or Coverage())
    if why is not None:
        return _unchecked("recovery_min", name, lost_by, bound, why)
    evals = {k: records[k]["evaluation"] for k in (name, lost_by, base)}
    metric = "top1" if "top1" in evals[base]["metrics"] else "ppl"
    missing = [k for k, ev in evals.items() if metric not in ev.get("metrics", {})]
    if missing:
        return _unchecked("recovery_min", name, lost_by, bound, f"metric '{metric}' missing for {', '.join(missing)}")
    sign = 1.0 if metric == "top1" else -1.0  # higher top-1 is better, lower perplexity is
    q = {k: sign * ev["metrics"][metric] for k, ev in evals.items()}
    lost = q[base] - q[lost_by]
    detail = f"{metric}: {base} {evals[base]['metrics'][metric]:.2f}, {lost_by} {evals[lost_by]['metrics'][metric]:.2f}"
    detail += f", {name} {evals[name]['metrics'][metric]:.2f}"
    if lost <= 0:
        return GateResult("recovery_min", name, lost_by, None, bound, "pass", detail + f" ({lost_by} lost nothing)")
    recovered = (q[name] - q[lost_by]) / lost
    return _judged("recovery_min", name, lost_by, recovered, bound, recovered >= at_least, detail)


def _p50(record: dict[str, Any] | None, batch_size: int) -> float | None:
    bench = (record or {}).get("bench")
    if not bench:
        return None
    for lat in bench["latency"]:
        if lat["batch_size"] == batch_size:
            return lat["p50_ms"]
    return None


def _tps(record: dict[str, Any] | None, batch_size: int) -> float | None:
    llm = ((record or {}).get("bench") or {}).get("llm")
    if not llm:
        return None
    rates = {int(k): v for k, v in llm["decode_tokens_per_s"].items()}  # JSON turns int keys into strings
    return float(rates[batch_size]) if batch_size in rates else None
