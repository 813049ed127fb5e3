"""Render a run's manifest as `report.md`: what each artifact cost and gained, and the verdict."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.atomic import atomic_path
from compress.paths import PLOT_FILE, REPORT_FILE, REPORT_HTML_FILE
from compress.records import ArtifactRecord, Comparison, GateRecord, RunManifest
from compress.report import mixed_bits, sensitivity

if TYPE_CHECKING:
    from compress.report.html import Evidence


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Any, spec: str = ".2f", missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def artifacts_table(manifest: RunManifest) -> str:
    """One row per artifact: format, size, metrics, changes vs baseline and vs parent, p50 latency."""
    return _table(*artifacts_rows(manifest))


def artifacts_rows(manifest: RunManifest) -> tuple[list[str], list[list[str]]]:
    """The artifacts table as (header, rows) of display strings (report.md and report.html show the same)."""
    comparisons = manifest.comparisons
    batches = manifest.bench_settings.get("batch_sizes", [])
    first = comparisons[0]
    header = [
        "artifact",
        "stage",
        "format",
        "precision",
        "size MB",
        *manifest.metric_names,
        *[f"{c.label} vs baseline" for c in comparisons],
        f"{first.label} vs parent",
        *[f"p50 ms b{b}" for b in batches],
        "speedup b1 vs baseline",
    ]
    base_p50 = _p50s(manifest.record(manifest.baseline))
    rows = []
    for rec in manifest.artifacts:
        art, ev = rec.artifact, rec.evaluation
        metrics = ev.metrics if ev else {}
        vs_base, vs_parent = (ev.vs_baseline or {}) if ev else {}, (ev.vs_parent or {}) if ev else {}
        p50 = _p50s(rec)
        speed = (base_p50[0] / p50[0]) if p50 and base_p50 and p50[0] else None
        rows.append(
            [
                art["name"],
                art["stage"],
                art["format"],
                art["precision"] + (f" / {art['target']}" if art.get("target") else ""),
                f"{art['size_bytes'] / 1e6:.2f}",
                *[_fmt(metrics.get(m)) for m in manifest.metric_names],
                *[_signed(vs_base, c) for c in comparisons],
                _signed(vs_parent, first),
                *[_fmt(v) for v in (p50 or [None] * len(batches))],
                _fmt(speed, ".2f") + ("×" if speed else ""),
            ]
        )
    return header, rows


def _signed(values: Mapping[str, float], column: Comparison) -> str:
    value = values.get(column.key)
    if value is None:
        return "–"
    return _fmt(column.sign * value, "+.2f" if column.sign != 1 else ".2f")


def latency_table(manifest: RunManifest) -> str:
    return _table(*latency_rows(manifest))


def latency_rows(manifest: RunManifest) -> tuple[list[str], list[list[str]]]:
    rows = []
    for rec in manifest.artifacts:
        bench = rec.bench
        if bench is None:
            continue
        for lat in bench.latency:
            rows.append(
                [
                    rec.name,
                    bench.backend,
                    str(bench.threads),
                    str(lat.batch_size),
                    _fmt(lat.p50_ms),
                    _fmt(lat.p90_ms),
                    _fmt(lat.p99_ms),
                    _fmt(lat.throughput, ".1f"),
                    _fmt(bench.peak_rss_mb, ".0f"),
                ]
            )
    return ["artifact", "backend", "threads", "batch", "p50 ms", "p90 ms", "p99 ms", "items/s", "peak RSS MB"], rows


def stages_rows(manifest: RunManifest) -> tuple[list[str], list[list[str]]]:
    """Time and peak RSS of the work each artifact took in this run (stage, evaluation); `cached` when reused.

    Peak RSS is this process's resident high-water mark during that work (`compress.memory`: the method is
    shown); 'above start' is how much it rose over the RSS the work began with.
    """
    rows = []
    for rec in manifest.artifacts:
        stage, evaluation = rec.memory.get("stage"), rec.memory.get("evaluation")
        cached = "cached" if rec.cached else "–"
        seconds = rec.info.get("stage_seconds")
        rows.append(
            [
                rec.name,
                rec.artifact["stage"],
                cached if rec.cached else _fmt(seconds, ".1f"),
                _fmt(stage["peak_rss_mb"], ".0f") if stage else cached,
                _fmt(stage["peak_rss_mb"] - stage["start_rss_mb"], ".0f") if stage else cached,
                _fmt(evaluation["peak_rss_mb"], ".0f") if evaluation else "–",
                "/".join(sorted({p["method"] for p in (stage, evaluation) if p})) or "–",
            ]
        )
    header = ["artifact", "stage", "seconds", "peak RSS MB", "above start MB", "evaluation peak RSS MB", "method"]
    return header, rows


def texts_table(manifest: RunManifest) -> str:
    """Causal-lm perplexity on each text (`data.text` and `data.texts`), its rise vs baseline and vs parent."""
    header, rows = texts_rows(manifest)
    return _table(header, rows) if rows else ""


def texts_rows(manifest: RunManifest) -> tuple[list[str], list[list[str]]]:
    """Empty unless the run measured more than one text (metrics `ppl:NAME`)."""
    names = [m.removeprefix("ppl:") for m in manifest.metric_names if m.startswith("ppl:")]
    if not names:
        return [], []
    texts = [("text", "ppl", "ppl_rise_pct"), *((n, f"ppl:{n}", f"ppl_rise_pct:{n}") for n in names)]
    header = ["artifact"]
    for name, _, _ in texts:
        header += [f"ppl {name}", f"{name} rise % vs baseline", f"{name} rise % vs parent"]
    rows = []
    for rec in manifest.artifacts:
        ev = rec.evaluation
        if ev is None:
            continue
        row = [rec.name]
        for _, metric, rise in texts:
            row += [
                _fmt(ev.metrics.get(metric), ".3f"),
                _fmt((ev.vs_baseline or {}).get(rise), "+.2f"),
                _fmt((ev.vs_parent or {}).get(rise), "+.2f"),
            ]
        rows.append(row)
    return header, rows


def llm_table(manifest: RunManifest) -> str:
    """Causal-lm speed: prefill per prompt length, decode tokens/s per batch, and the bandwidth bound."""
    header, rows = llm_rows(manifest)
    return _table(header, rows) if rows else ""


def llm_rows(manifest: RunManifest) -> tuple[list[str], list[list[str]]]:
    recs = [r for r in manifest.artifacts if r.bench is not None and r.bench.llm]
    if not recs:
        return [], []
    first = recs[0].bench.llm
    lengths = sorted(int(k) for k in first["prefill_ms"])
    batches = sorted(int(k) for k in first["decode_tokens_per_s"])
    header = [
        "artifact",
        "backend",
        "engine",
        "weights MB",
        *[f"prefill {n} ms" for n in lengths],
        f"TTFT {lengths[-1]} ms",
        *[f"decode tok/s b{b}" for b in batches],
        "decode step b1 ms",
        "bound ms",
        "of bound",
        "peak RSS MB",
    ]
    rows = []
    for rec in recs:
        llm = rec.bench.llm
        prefill = {int(k): v for k, v in llm["prefill_ms"].items()}
        tps = {int(k): v for k, v in llm["decode_tokens_per_s"].items()}
        step = {int(k): v for k, v in llm["decode_step_ms"].items()}.get(1)
        share = llm["decode_bound_ms"] / step if step else None
        rows.append(
            [
                rec.name,
                rec.bench.backend,
                llm.get("engine") or rec.bench.backend,  # records made before `engine` existed: the session
                _fmt(llm["weight_mb"], ".1f"),
                *[_fmt(prefill.get(n)) for n in lengths],
                _fmt({int(k): v for k, v in llm["ttft_ms"].items()}.get(lengths[-1])),
                *[_fmt(tps.get(b), ".1f") for b in batches],
                _fmt(step),
                _fmt(llm["decode_bound_ms"]),
                _fmt(100 * share if share else None, ".0f") + "%",
                _fmt(rec.bench.peak_rss_mb, ".0f"),
            ]
        )
    return header, rows


def decode_sweep(manifest: RunManifest) -> dict[str, dict[int, float]]:
    """Per benchmarked causal-lm artifact: batch-1 decode tokens/s by prompt length, when the run swept more
    than one length (`bench.decode_prompt_lengths`); empty otherwise."""
    out = {}
    for rec in manifest.artifacts:
        by_prompt = ((rec.bench.llm or {}) if rec.bench else {}).get("decode_tokens_per_s_by_prompt", {})
        out[rec.name] = {int(k): float(v) for k, v in sorted(by_prompt.items(), key=lambda kv: int(kv[0]))}
    return {name: row for name, row in out.items() if row} if any(len(r) > 1 for r in out.values()) else {}


def decode_sweep_rows(manifest: RunManifest) -> tuple[list[str], list[list[str]]]:
    sweep = decode_sweep(manifest)
    lengths = sorted({n for row in sweep.values() for n in row})
    rows = [[name, *[_fmt(row.get(n), ".1f") for n in lengths]] for name, row in sweep.items()]
    return ["artifact", *[f"decode tok/s after {n}" for n in lengths]], rows


STATUS_LABELS = {"pass": "PASS", "fail": "**FAIL**", "not-checked": "not checked"}
TITLES = {"PASS": "PASS — all gates hold", "FAIL": "FAIL — a gate is breached"}
UNFINISHED = {"running": "run in progress", "failed": "run failed", "interrupted": "run interrupted"}


def gates_table(manifest: RunManifest) -> str:
    header, rows = gates_rows(manifest)
    return _table(header, rows) if rows else "_no gates_"


def gates_rows(manifest: RunManifest) -> tuple[list[str], list[list[str]]]:
    rows = [
        [STATUS_LABELS[g.status], g.gate, g.artifact, g.vs, _fmt(g.value, ".3g"), g.bound, g.detail]
        for g in manifest.gates
    ]
    return ["status", "gate", "artifact", "vs", "value", "bound", "detail"], rows


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def verdict_title(verdict: str, unchecked: int) -> str:
    return TITLES.get(verdict) or f"INCOMPLETE — {_plural(unchecked, 'gate')} not checked"


def _gate_notes(gates: list[GateRecord], verdict: str) -> list[str]:
    """What was breached, and what could not be checked with the reason."""
    failed = [g for g in gates if g.status == "fail"]
    unchecked = [g for g in gates if g.status == "not-checked"]
    out = []
    if failed:
        out += ["Breached: " + "; ".join(f"{g.gate} on `{g.artifact}` ({g.detail})" for g in failed), ""]
    if unchecked:
        head = "INCOMPLETE" if verdict == "INCOMPLETE" else "Also"
        out += [f"{head}: {_plural(len(unchecked), 'gate')} not checked (a gate not checked is not a pass):", ""]
        out += [f"- {g.gate} on `{g.artifact}`: {g.detail}" for g in unchecked] + [""]
    return out


def render_unfinished(
    name: str, pipeline_file: str, started: str, state: str, *, step: str | None = None, error: str | None = None
) -> str:
    """report.md of a run that has no verdict: still running, failed or interrupted."""
    out = [f"# {name}: {UNFINISHED[state]} — no verdict", ""]
    if state == "running":
        out.append(
            f"A run of `{pipeline_file}` started {started} and has not finished; no gate has been checked yet and "
            "the report of any earlier run is withdrawn. If this stays, the run was killed: see `run.log`."
        )
    elif state == "interrupted":
        out.append(
            f"The run of `{pipeline_file}` started {started} was interrupted (Ctrl-C) during {step}. No gate was "
            "checked. Finished artifacts are kept; the next run resumes from them."
        )
    else:
        out.append(
            f"The run of `{pipeline_file}` started {started} failed during {step}: `{error}`. No gate was checked. "
            "Artifacts finished before the failure are kept; the traceback is in `run.log`."
        )
    return "\n".join(out) + "\n"


def _float_notes(m: RunManifest) -> list[str]:
    """Which nodes an INT8 transformer graph kept in float, and why (from its info's `float_op_types`)."""
    notes = []
    for rec in m.artifacts:
        info = rec.artifact.get("info") or {}
        if (info.get("ort_session_config") or {}).get("session.disable_quant_qdq") == "1":
            notes.append(
                f"`{rec.name}` targets TensorRT: on CPU it is evaluated with ONNX Runtime's Q/DQ fusion off "
                "(float ops between Quantize/DequantizeLinear, the arithmetic TensorRT's int8 kernels reproduce), "
                "so its quality is TensorRT's, and its CPU latency is not an int8 latency."
            )
        if info.get("int8_dot_saturates"):
            notes.append(
                f"`{rec.name}` was quantized and measured on a CPU without VNNI, where ONNX Runtime's u8·s8 "
                "kernels can saturate: its accuracy here may be lower than on a VNNI CPU (`reduce_range: true` "
                "avoids the saturation at the cost of a 7-bit weight range)."
            )
        kept = info.get("float_op_types")
        if not kept:
            continue
        shown = ", ".join(f"{op} ×{n}" for op, n in kept.items())
        quantized = "/".join(info.get("quantized_op_types", []))
        notes.append(
            f"`{rec.name}` is INT8 on {quantized} only; these nodes stay float: {shown}. LayerNorm, Softmax, "
            "GELU (Erf) and the residual Adds are where 8-bit per-tensor ranges cost a transformer its accuracy "
            "(outlier channels into LayerNorm, Softmax values spanning orders of magnitude), and ONNX Runtime "
            "and TensorRT run them no faster in INT8."
        )
    return notes


def render(m: RunManifest, evidence: Evidence | None = None) -> str:
    """report.md of a finished run; `evidence` adds what the manifest does not hold (preset continuations)."""
    if m.verdict is None:
        raise ValueError("render() is for finished runs; render_unfinished() says why there is no verdict")
    verdict = m.verdict
    unchecked = sum(g.status == "not-checked" for g in m.gates)
    out = [
        f"# {m.pipeline['name']}: {verdict_title(verdict, unchecked)}",
        "",
        f"Pipeline `{m.pipeline['file']}`, family `{m.pipeline['family']}`, baseline `{m.baseline}`; "
        f"made {m.created} by compress {m.compress_version}.",
        "",
    ]
    notes = [*m.notes, *_float_notes(m)]
    out += [f"> **Note.** {note}" for note in notes] + ([""] if notes else [])
    out += ["## Artifacts", "", artifacts_table(m), ""]
    texts = texts_table(m)
    out += ["## Perplexity per text", "", texts, ""] if texts else []
    out += ["## Gates", "", gates_table(m), ""] + _gate_notes(list(m.gates), verdict)
    out += sensitivity_sections(m) + mixed_bits_sections(m)
    if any(rec.bench for rec in m.artifacts):
        mach = m.machine or {}
        llm = llm_table(m)
        bound = (
            " Bound: the time to read the weights a decode step uses once at the measured memory-copy "
            f"bandwidth ({mach.get('copy_bandwidth_gbs')} GB/s); 'of bound' is how close a decode step comes to it."
            if llm
            else ""
        )
        out += [
            "## Latency",
            "",
            llm or latency_table(m),
            "",
            *(
                ["Batch-1 decode tokens/s after a prompt of each length:", "", _table(*decode_sweep_rows(m)), ""]
                if decode_sweep(m)
                else []
            ),
            f"Measured side by side in one run, each artifact in its own process, warm-up "
            f"{m.bench_settings['warmup']}, {m.bench_settings['iterations']} iterations. "
            f"CPU: {mach.get('cpu')} ({mach.get('cores')} cores; flags {', '.join(mach.get('cpu_flags', []))}); "
            f"torch {mach.get('torch')}, onnxruntime {mach.get('onnxruntime')}.{bound}",
            "",
        ]
        out += [f"![accuracy vs latency]({PLOT_FILE})", ""]
    if m.skipped:
        out += ["## Skipped", ""] + [f"- `{s['artifact']}` ({s['stage']}): {s['reason']}" for s in m.skipped] + [""]
    out += ["## Stages: time and memory", "", _table(*stages_rows(m)), ""]
    out += _presets(evidence)
    out += ["## Stage details", ""]
    for rec in m.artifacts:
        if rec.info:
            own = sensitivity.KEYS + mixed_bits.KEYS  # they have their section
            shown = {k: v for k, v in rec.info.items() if k not in own}
            details = ", ".join(f"{k} {_detail(v)}" for k, v in shown.items())
            out.append(f"- `{rec.name}` ({rec.artifact['stage']} from `{rec.parent}`): {details}")
    out += ["", "## Data", ""] + [f"- {role}: sha256 `{h}`" for role, h in m.data.items()] + [""]
    return "\n".join(out)


def sensitivity_file(name: str) -> str:
    return f"sensitivity-{name}.png"


def sensitivity_sections(m: RunManifest) -> list[str]:
    """One section per INT8 artifact with a sensitivity analysis (compress/report/sensitivity.py)."""
    out: list[str] = []
    for rec in m.artifacts:
        if not sensitivity.has_section(rec.info):
            continue
        out += [f"## Sensitivity and accuracy budget: `{rec.name}`", ""]
        out += [part for line in sensitivity.summary(rec.info) for part in (line, "")]
        if "accuracy_budget" in rec.info:
            out += [_table(*sensitivity.steps_rows(rec.info)), ""]
        out += [
            f"![sensitivity of {rec.name}]({sensitivity_file(rec.name)})",
            "",
            _table(*sensitivity.nodes_rows(rec.info)),
            "",
        ]
    return out


def mixed_bits_sections(m: RunManifest) -> list[str]:
    """One section per mixed 4/8-bit artifact (compress/report/mixed_bits.py)."""
    out: list[str] = []
    for rec in m.artifacts:
        if mixed_bits.has_section(rec.info):
            out += [f"## Mixed 4/8 bits under {mixed_bits.title(rec.info)}: `{rec.name}`", ""]
            out += [part for line in mixed_bits.summary(rec.info) for part in (line, "")]
            if "accuracy_budget" in rec.info:
                out += [_table(*mixed_bits.steps_rows(rec.info)), ""]
            out += [_table(*mixed_bits.units_rows(rec.info)), ""]
    return out


def _write_png(png: bytes, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)


def _presets(evidence: Evidence | None) -> list[str]:
    """The decoding presets' continuations (causal-lm `data.presets`), or nothing."""
    from compress.report import llm as llm_report

    if evidence is None:
        return []
    decode = evidence.view.decode or (lambda ids: [f"{i} " for i in ids])
    view = llm_report.preset_texts({n: e.outputs for n, e in evidence.evaluations.items()}, decode)
    return [] if view is None else llm_report.presets_markdown(view)


def write_report(manifest: RunManifest, run_dir: Path, evidence: Evidence | None = None) -> dict[Path, str]:
    """Write the plot, report.md and report.html; return each file that could not be written (or a section of
    report.html that could not be drawn), with why."""
    from compress.report.html import Evidence, write_html
    from compress.report.plots import plot_accuracy_vs_latency

    problems = {}
    html_path = run_dir / REPORT_HTML_FILE
    outputs = [
        (run_dir / REPORT_FILE, lambda path: write_text_atomic(path, render(manifest, evidence))),
        (html_path, lambda path: write_html(manifest, run_dir, evidence or Evidence(), path)),
    ]
    if any(rec.bench for rec in manifest.artifacts):
        outputs.insert(0, (run_dir / PLOT_FILE, lambda path: plot_accuracy_vs_latency(manifest, path)))
    for rec in manifest.artifacts:
        if sensitivity.has_section(rec.info):
            png = (lambda info, name: lambda path: _write_png(sensitivity.figure(info, name), path))(rec.info, rec.name)
            outputs.insert(0, (run_dir / sensitivity_file(rec.name), png))
    for path, write in outputs:
        try:
            sections = write(path)
        except Exception as exc:  # neither a full disk nor a bug in plotting or rendering may flip a verdict
            problems[path] = f"{type(exc).__name__}: {exc}"
            continue
        if sections:
            problems[path] = "written without " + "; ".join(sections)
    return problems


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _p50s(record: ArtifactRecord | None) -> list[float] | None:
    if record is None or record.bench is None:
        return None
    return [lat.p50_ms for lat in record.bench.latency]


def _detail(value: Any) -> str:
    """A stage's `info` value as the report shows it: a [before, after] pair as `before -> after`."""
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
        return f"{value[0]} -> {value[1]}"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {_detail(v)}" for k, v in value.items()) + ")"
    return str(value)
