"""Gates: bounds on what each artifact lost or gained against the baseline."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from compress.config import PipelineConfig


@dataclass(frozen=True)
class GateResult:
    gate: str
    artifact: str
    vs: str
    value: float | None
    bound: str
    passed: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_gates(cfg: PipelineConfig, records: dict[str, dict[str, Any]]) -> list[GateResult]:
    """`records[name]` holds an artifact's `evaluation` (with `vs_baseline`), `bench` and `size_bytes`."""
    out: list[GateResult] = []
    base = cfg.baseline
    # Default: what each branch delivers among the artifacts that exist (a skipped optional engine leaves its
    # input as the branch's last artifact).
    parents = {rec["artifact"]["parent"] for rec in records.values()}
    on = cfg.gates.metric_gates_on  # [] gates nothing; unset (None) gates every branch's end
    gated = set(on if on is not None else (name for name in records if name not in parents))
    if cfg.gates.top1_drop_max is not None:
        bound = cfg.gates.top1_drop_max
        for name, rec in records.items():
            ev = rec.get("evaluation")
            if name == base or name not in gated or not ev or "vs_baseline" not in ev:
                continue
            drop = ev["vs_baseline"]["top1_drop"]
            out.append(
                GateResult(
                    "top1_drop_max",
                    name,
                    base,
                    drop,
                    f"<= {bound} points",
                    drop <= bound,
                    f"top-1 {ev['metrics']['top1']:.2f}% vs {records[base]['evaluation']['metrics']['top1']:.2f}%",
                )
            )
    if cfg.gates.ppl_rise_max is not None:
        bound = cfg.gates.ppl_rise_max
        for name, rec in records.items():
            ev = rec.get("evaluation")
            if name == base or name not in gated or not ev or "vs_baseline" not in ev:
                continue
            rise = ev["vs_baseline"]["ppl_rise_pct"]
            detail = f"perplexity {ev['metrics']['ppl']:.3f} vs {records[base]['evaluation']['metrics']['ppl']:.3f}"
            out.append(GateResult("ppl_rise_max", name, base, rise, f"<= {bound} %", rise <= bound, detail))
    for gate in cfg.gates.decode_speedup_min:
        vs = base if gate.vs == "baseline" else gate.vs
        a, b = _tps(records.get(gate.artifact), gate.batch_size), _tps(records.get(vs), gate.batch_size)
        if a is None or b is None:
            out.append(
                GateResult(
                    "decode_speedup_min",
                    gate.artifact,
                    vs,
                    None,
                    f">= {gate.at_least}x",
                    False,
                    f"decode speed at batch {gate.batch_size} not measured",
                )
            )
            continue
        ratio = a / b
        out.append(
            GateResult(
                "decode_speedup_min",
                gate.artifact,
                vs,
                ratio,
                f">= {gate.at_least}x",
                ratio >= gate.at_least,
                f"decode at batch {gate.batch_size}: {a:.1f} vs {b:.1f} tokens/s",
            )
        )
    for gate in cfg.gates.speedup_min:
        vs = base if gate.vs == "baseline" else gate.vs
        a, b = _p50(records.get(gate.artifact), gate.batch_size), _p50(records.get(vs), gate.batch_size)
        if a is None or b is None:
            out.append(
                GateResult(
                    "speedup_min",
                    gate.artifact,
                    vs,
                    None,
                    f">= {gate.at_least}x",
                    False,
                    f"latency at batch {gate.batch_size} not measured (benchmarks disabled or artifact skipped)",
                )
            )
            continue
        ratio = b / a
        out.append(
            GateResult(
                "speedup_min",
                gate.artifact,
                vs,
                ratio,
                f">= {gate.at_least}x",
                ratio >= gate.at_least,
                f"p50 at batch {gate.batch_size}: {a:.2f} ms vs {b:.2f} ms",
            )
        )
    for gate in cfg.gates.size_ratio_max:
        vs = base if gate.vs == "baseline" else gate.vs
        a, b = records.get(gate.artifact, {}).get("size_bytes"), records.get(vs, {}).get("size_bytes")
        if not a or not b:
            out.append(
                GateResult("size_ratio_max", gate.artifact, vs, None, f"<= {gate.at_most}", False, "artifact missing")
            )
            continue
        ratio = a / b
        out.append(
            GateResult(
                "size_ratio_max",
                gate.artifact,
                vs,
                ratio,
                f"<= {gate.at_most}",
                ratio <= gate.at_most,
                f"{a / 1e6:.2f} MB vs {b / 1e6:.2f} MB",
            )
        )
    for gate in cfg.gates.recovery_min:
        out.append(_recovery(gate.artifact, gate.lost_by, gate.at_least, base, records))
    return out


def _recovery(name: str, lost_by: str, at_least: float, base: str, records: dict[str, dict[str, Any]]) -> GateResult:
    """Fraction of the quality `lost_by` lost vs `base` that `name` wins back (top-1, or perplexity's drop)."""
    bound = f">= {at_least:g}"
    evals = {k: (records.get(k) or {}).get("evaluation") for k in (name, lost_by, base)}
    missing = [k for k, ev in evals.items() if not ev or not ev.get("metrics")]
    if missing:
        return GateResult("recovery_min", name, lost_by, None, bound, False, f"not evaluated: {', '.join(missing)}")
    metric = "top1" if "top1" in evals[base]["metrics"] else "ppl"
    sign = 1.0 if metric == "top1" else -1.0  # higher top-1 is better, lower perplexity is
    q = {k: sign * ev["metrics"][metric] for k, ev in evals.items()}
    lost = q[base] - q[lost_by]
    detail = f"{metric}: {base} {evals[base]['metrics'][metric]:.2f}, {lost_by} {evals[lost_by]['metrics'][metric]:.2f}"
    detail += f", {name} {evals[name]['metrics'][metric]:.2f}"
    if lost <= 0:
        return GateResult("recovery_min", name, lost_by, None, bound, True, detail + f" ({lost_by} lost nothing)")
    recovered = (q[name] - q[lost_by]) / lost
    return GateResult("recovery_min", name, lost_by, recovered, bound, recovered >= at_least, detail)


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
