"""Render a run's manifest as `report.md`: what each artifact cost and gained, and the verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Any, spec: str = ".2f", missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def artifacts_table(manifest: dict[str, Any]) -> str:
    """One row per artifact: format, size, metrics, changes vs baseline and vs parent, p50 latency."""
    comparisons = manifest["comparisons"]  # [{key, label, sign}] from the adapter
    batches = manifest.get("bench_settings", {}).get("batch_sizes", [])
    first = comparisons[0]
    header = [
        "artifact",
        "stage",
        "format",
        "precision",
        "size MB",
        *manifest["metric_names"],
        *[f"{c['label']} vs baseline" for c in comparisons],
        f"{first['label']} vs parent",
        *[f"p50 ms b{b}" for b in batches],
        "speedup b1 vs baseline",
    ]
    base_p50 = _p50s(_find(manifest, manifest["baseline"]))
    rows = []
    for rec in manifest["artifacts"]:
        art, ev = rec["artifact"], rec.get("evaluation") or {}
        metrics, vs_base, vs_parent = ev.get("metrics", {}), ev.get("vs_baseline", {}), ev.get("vs_parent", {})
        p50 = _p50s(rec)
        speed = (base_p50[0] / p50[0]) if p50 and base_p50 and p50[0] else None
        rows.append(
            [
                art["name"] + (" (cached)" if rec.get("cached") else ""),
                art["stage"],
                art["format"],
                art["precision"] + (f" / {art['target']}" if art.get("target") else ""),
                f"{art['size_bytes'] / 1e6:.2f}",
                *[_fmt(metrics.get(m)) for m in manifest["metric_names"]],
                *[_signed(vs_base, c) for c in comparisons],
                _signed(vs_parent, first),
                *[_fmt(v) for v in (p50 or [None] * len(batches))],
                _fmt(speed, ".2f") + ("×" if speed else ""),
            ]
        )
    return _table(header, rows)


def _signed(values: dict[str, float], column: dict[str, Any]) -> str:
    value = values.get(column["key"])
    if value is None:
        return "–"
    return _fmt(column["sign"] * value, "+.2f" if column["sign"] != 1 else ".2f")


def latency_table(manifest: dict[str, Any]) -> str:
    rows = []
    for rec in manifest["artifacts"]:
        bench = rec.get("bench")
        if not bench:
            continue
        for lat in bench["latency"]:
            rows.append(
                [
                    rec["artifact"]["name"],
                    bench["backend"],
                    str(bench["threads"]),
                    str(lat["batch_size"]),
                    _fmt(lat["p50_ms"]),
                    _fmt(lat["p90_ms"]),
                    _fmt(lat["p99_ms"]),
                    _fmt(lat["throughput"], ".1f"),
                    _fmt(bench["peak_rss_mb"], ".0f"),
                ]
            )
    return _table(
        ["artifact", "backend", "threads", "batch", "p50 ms", "p90 ms", "p99 ms", "items/s", "peak RSS MB"], rows
    )


def gates_table(manifest: dict[str, Any]) -> str:
    rows = [
        [
            ("PASS" if g["passed"] else "**FAIL**"),
            g["gate"],
            g["artifact"],
            g["vs"],
            _fmt(g["value"], ".3g"),
            g["bound"],
            g["detail"],
        ]
        for g in manifest["gates"]
    ]
    return _table(["", "gate", "artifact", "vs", "value", "bound", "detail"], rows) if rows else "_no gates_"


def render(manifest: dict[str, Any]) -> str:
    m = manifest
    verdict = "PASS — all gates hold" if m["passed"] else "FAIL — a gate is breached"
    out = [
        f"# {m['pipeline']['name']}: {verdict}",
        "",
        f"Pipeline `{m['pipeline']['file']}`, family `{m['pipeline']['family']}`, baseline `{m['baseline']}`; "
        f"made {m['created']} by compress {m['compress_version']}.",
        "",
    ]
    out += ["## Artifacts", "", artifacts_table(m), ""]
    failed = [g for g in m["gates"] if not g["passed"]]
    out += ["## Gates", "", gates_table(m), ""]
    if failed:
        out += ["Breached: " + "; ".join(f"{g['gate']} on `{g['artifact']}` ({g['detail']})" for g in failed), ""]
    if any(rec.get("bench") for rec in m["artifacts"]):
        mach = m["machine"]
        out += [
            "## Latency",
            "",
            latency_table(m),
            "",
            f"Measured side by side in one run, each artifact in its own process, warm-up "
            f"{m['bench_settings']['warmup']}, {m['bench_settings']['iterations']} iterations. "
            f"CPU: {mach.get('cpu')} ({mach.get('cores')} cores; flags {', '.join(mach.get('cpu_flags', []))}); "
            f"torch {mach.get('torch')}, onnxruntime {mach.get('onnxruntime')}.",
            "",
        ]
        out += ["![accuracy vs latency](accuracy_vs_latency.png)", ""]
    if m["skipped"]:
        out += ["## Skipped", ""] + [f"- `{s['artifact']}` ({s['stage']}): {s['reason']}" for s in m["skipped"]] + [""]
    out += ["## Stage details", ""]
    for rec in m["artifacts"]:
        art = rec["artifact"]
        if art["info"]:
            details = ", ".join(f"{k} {v}" for k, v in art["info"].items())
            out.append(f"- `{art['name']}` ({art['stage']} from `{art['parent']}`): {details}")
    out += ["", "## Data", ""] + [f"- {role}: sha256 `{h}`" for role, h in m["data"].items()] + [""]
    return "\n".join(out)


def write_report(manifest: dict[str, Any], run_dir: Path) -> None:
    from compress.report.plots import plot_accuracy_vs_latency

    if any(rec.get("bench") for rec in manifest["artifacts"]):
        plot_accuracy_vs_latency(manifest, run_dir / "accuracy_vs_latency.png")
    tmp = run_dir / ".report.md.tmp"
    tmp.write_text(render(manifest))
    tmp.replace(run_dir / "report.md")


def _find(manifest: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((r for r in manifest["artifacts"] if r["artifact"]["name"] == name), None)


def _p50s(record: dict[str, Any] | None) -> list[float] | None:
    bench = (record or {}).get("bench")
    return [lat["p50_ms"] for lat in bench["latency"]] if bench else None
