"""report.html: one self-contained file (images inlined as base64, tables sortable by a few lines of inline
JS, nothing fetched from a network) with the tables of report.md and the pictures people look at: per-sample
vision pictures or causal-lm continuations, run-level plots, and the data and model cards."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.atomic import atomic_path
from compress.families.base import Evaluation, ReportView
from compress.records import RunManifest
from compress.report import llm as llm_report
from compress.report import mixed_bits, plots, sensitivity
from compress.report import vision as vision_report
from compress.report.markdown import (
    _float_notes,
    artifacts_rows,
    decode_sweep,
    decode_sweep_rows,
    gates_rows,
    latency_rows,
    llm_rows,
    stages_rows,
    verdict_title,
)


@dataclass(frozen=True)
class Evidence:
    """What the HTML report reads beyond the manifest: each artifact's evaluation, the family's view."""

    evaluations: Mapping[str, Evaluation] = field(default_factory=dict)
    view: ReportView = field(default_factory=ReportView)
    model: Mapping[str, Any] = field(default_factory=dict)  # the pipeline's validated `model:` options
    command: str = ""  # the command that reruns the pipeline


_JS = """
document.querySelectorAll('table.sortable th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], up = th.dataset.dir !== 'up';
  th.closest('tr').querySelectorAll('th').forEach(h => delete h.dataset.dir); th.dataset.dir = up ? 'up' : 'down';
  const key = r => { const t = r.cells[col].innerText.replace(/[×%+]/g, ''); const n = parseFloat(t);
                     return isNaN(n) ? t : n; };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    return (x > y ? 1 : x < y ? -1 : 0) * (up ? 1 : -1); }).forEach(r => body.appendChild(r));
}));
"""
_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px}
th{background:#f0f0f0;cursor:pointer}th[data-dir=up]::after{content:' ▲'}th[data-dir=down]::after{content:' ▼'}
.PASS{color:#080}.FAIL{color:#b00}.INCOMPLETE{color:#a60}.note{background:#fffbe6;padding:.4em .8em}
img{max-width:100%;border:1px solid #eee}mark{background:#fbb}pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:0}
"""


def write_html(manifest: RunManifest, run_dir: Path, evidence: Evidence, path: Path) -> list[str]:
    """Write report.html atomically; return the sections that could not be drawn (warnings, not errors)."""
    text, problems = render_html(manifest, run_dir, evidence)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return problems


def render_html(manifest: RunManifest, run_dir: Path, evidence: Evidence) -> tuple[str, list[str]]:
    m = manifest
    unchecked = sum(g.status == "not-checked" for g in m.gates)
    title = f"{m.pipeline['name']}: {verdict_title(m.verdict or 'INCOMPLETE', unchecked)}"
    body = [f'<h1 class="{m.verdict}">{_e(title)}</h1>']
    body.append(
        f"<p>Pipeline <code>{_e(m.pipeline['file'])}</code>, family <code>{_e(m.pipeline['family'])}</code>, "
        f"baseline <code>{_e(m.baseline)}</code>; made {_e(m.created)} by compress {_e(m.compress_version)}.</p>"
    )
    body += [f'<p class="note">{_e(n)}</p>' for n in [*m.notes, *_float_notes(m)]]
    body += ["<h2>Artifacts</h2>", _html_table(*artifacts_rows(m)), "<h2>Gates</h2>", _html_table(*gates_rows(m))]
    body += ["<h2>Stages: time and memory</h2>", _html_table(*stages_rows(m))]
    problems: list[str] = []
    sections: list[tuple[str, Callable[[], list[str]]]] = [
        ("plots", lambda: _plots(m, run_dir)),
        ("vision", lambda: _vision(m, evidence)),
        ("sensitivity", lambda: _sensitivity(m)),
        ("mixed bits", lambda: _mixed_bits(m)),
        ("language model", lambda: _llm(m, evidence)),
        ("cards", lambda: _cards(m, run_dir, evidence)),
    ]
    for name, section in sections:
        try:
            body += section()
        except Exception as exc:  # a picture that cannot be drawn is a warning; the rest of the report stands
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
            body.append(f'<p class="note">The {name} section could not be drawn: {_e(str(exc))}</p>')
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + f"\n<script>{_JS}</script></body></html>\n"
    )
    return page, problems


def _e(value: Any) -> str:
    return html.escape(str(value))


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    cells = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>'


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _sensitivity(m: RunManifest) -> list[str]:
    """Per INT8 artifact with a sensitivity analysis: the budget, its steps, the plot and the sorted nodes."""
    out = []
    for rec in m.artifacts:
        if not sensitivity.has_section(rec.info):
            continue
        out.append(f"<h2>Sensitivity and accuracy budget: {_e(rec.name)}</h2>")
        out += [f"<p>{_e(line.replace('**', '').replace('`', ''))}</p>" for line in sensitivity.summary(rec.info)]
        if "accuracy_budget" in rec.info:
            out.append(_html_table(*sensitivity.steps_rows(rec.info)))
        out += [_img(sensitivity.figure(rec.info, rec.name), f"sensitivity of {rec.name}")]
        out.append(_html_table(*sensitivity.nodes_rows(rec.info)))
    return out


def _mixed_bits(m: RunManifest) -> list[str]:
    """Per mixed 4/8-bit artifact: the budget, the size check, the accuracy budget's steps and the units sorted by
    KL gain per MB."""
    out = []
    for rec in m.artifacts:
        if mixed_bits.has_section(rec.info):
            out.append(f"<h2>Mixed 4/8 bits under {mixed_bits.title(rec.info)}: {_e(rec.name)}</h2>")
            out += [f"<p>{_e(line.replace('**', '').replace('`', ''))}</p>" for line in mixed_bits.summary(rec.info)]
            if "accuracy_budget" in rec.info:
                out.append(_html_table(*mixed_bits.steps_rows(rec.info)))
            out.append(_html_table(*mixed_bits.units_rows(rec.info)))
    return out


def _plots(m: RunManifest, run_dir: Path) -> list[str]:
    out = ["<h2>Trade-offs</h2>"]
    metric = m.metric_names[0]
    if any(r.bench for r in m.artifacts):
        out.append(_img(plots.metric_vs_latency(m), f"{metric} vs latency"))
    out.append(_img(plots.metric_vs_size(m), f"{metric} vs size"))
    batch = plots.latency_vs_batch(m)
    if batch is not None:
        llm_header, llm_body = llm_rows(m)  # causal-lm: prefill, TTFT, decode tokens/s and the bandwidth bound
        speed = (llm_header, llm_body) if llm_body else latency_rows(m)
        out += ["<h3>Latency vs batch size</h3>", _img(batch, "latency vs batch size"), _html_table(*speed)]
    sweep = decode_sweep(m)
    if sweep:
        out += [
            "<h3>Decode speed vs prompt length</h3>",
            _img(plots.decode_vs_prompt(sweep), "decode tokens/s vs prompt length"),
            _html_table(*decode_sweep_rows(m)),
        ]
    for name, png in plots.kept_widths(m, run_dir).items():
        out += [f"<h3>Pruning: {_e(name)}</h3>", _img(png, f"{name} per-layer kept width")]
    return out


def _vision(m: RunManifest, ev: Evidence) -> list[str]:
    base = ev.evaluations.get(m.baseline)
    if base is None or "labels" not in base.samples or "confidence" not in base.samples:
        return []
    labels = np.asarray(base.samples["labels"])
    names = ev.view.class_names
    k = max(len(names), int(labels.max()) + 1)
    base_cm = vision_report.confusion_matrix(labels, base.predictions, k)
    base_acc = vision_report.per_class_accuracy(base_cm)
    out = ["<h2>Per-sample comparison with the baseline</h2>"]
    calib, curves = [], {}
    for name, e in ev.evaluations.items():
        if "confidence" not in e.samples:
            continue
        correct = e.predictions == labels
        conf = np.asarray(e.samples["confidence"])
        curves[name] = (conf, correct)
        flips = vision_report.flipped(labels, base.predictions, e.predictions)
        fixes = vision_report.flipped(labels, e.predictions, base.predictions)
        calib.append(
            [
                name,
                f"{100 * correct.mean():.2f}",
                f"{100 * (e.predictions == base.predictions).mean():.2f}",
                str(len(flips)),
                str(len(fixes)),
                f"{vision_report.expected_calibration_error(conf, correct):.2f}",
            ]
        )
    header = ["artifact", "top1 %", "agreement % vs baseline", "right→wrong", "wrong→right", "ECE % (15 bins)"]
    out += [_html_table(header, calib), _img(vision_report.reliability_figure(curves), "reliability diagram")]
    for name, e in ev.evaluations.items():
        if name == m.baseline or "confidence" not in e.samples:
            continue
        out += _vision_artifact(name, e, base, labels, base_cm, base_acc, names, ev.view)
    return out


def _vision_artifact(
    name: str,
    e: Evaluation,
    base: Evaluation,
    labels: np.ndarray,
    base_cm: np.ndarray,
    base_acc: np.ndarray,
    names: Sequence[str],
    view: ReportView,
) -> list[str]:
    cm = vision_report.confusion_matrix(labels, e.predictions, len(base_cm))
    acc = vision_report.per_class_accuracy(cm)
    rows = [
        [
            names[c] if c < len(names) else str(c),
            str(int(cm[c].sum())),
            f"{base_acc[c]:.1f}",
            f"{acc[c]:.1f}",
            f"{acc[c] - base_acc[c]:+.1f}",
        ]
        for c in range(len(cm))
    ]
    out = [f"<h3>{_e(name)} vs baseline</h3>", _img(vision_report.confusion_figure(cm, base_cm, names, name), "")]
    out.append(_html_table(["class", "samples", "baseline top1 %", "top1 %", "Δ points"], rows))
    flips = vision_report.flipped(labels, base.predictions, e.predictions)
    if len(flips) and view.examples is not None:
        conf = (np.asarray(base.samples["confidence"]), np.asarray(e.samples["confidence"]))
        grid = vision_report.flips_figure(
            flips, view.examples, labels, (base.predictions, conf[0]), (e.predictions, conf[1]), names
        )
        shown = min(len(flips), 24)
        out += [f"<p>{len(flips)} right→wrong flips; the first {shown}:</p>", _img(grid, f"{name} flips")]
    else:
        out.append(f"<p>{len(flips)} right→wrong flips.</p>")
    return out


def _llm(m: RunManifest, ev: Evidence) -> list[str]:
    nll = {n: np.asarray(e.samples["window_nll"]) for n, e in ev.evaluations.items() if "window_nll" in e.samples}
    out = []
    if nll:
        out += ["<h2>Perplexity per evaluation window</h2>", _img(llm_report.window_ppl_figure(nll), "ppl")]
    greedy = {n: e.outputs["greedy"] for n, e in ev.evaluations.items() if "greedy" in e.outputs}
    if not greedy:
        return out
    decode = ev.view.decode or (lambda ids: [f"{i} " for i in ids])
    expected = max((len(c) for cs in greedy.values() for c in cs), default=0)
    reference = greedy.get(m.baseline)
    out += [
        "<h2>Greedy continuations of the fixed prompts</h2>",
        "<p>Decoding is greedy (the evaluation's own; decoding presets are not applied here). "
        "The first token that differs from the baseline is marked.</p>",
    ]
    names = list(greedy)
    rows = []
    for p in range(len(next(iter(greedy.values())))):
        cells = []
        for n in names:
            tokens = decode(greedy[n][p])
            at = None if reference is None else llm_report.first_divergence(greedy[n][p], reference[p])
            text = "".join(f"<mark>{_e(t)}</mark>" if i == at else _e(t) for i, t in enumerate(tokens))
            if at is not None and at >= len(tokens):  # stopped before the baseline did
                text += "<mark>[ends here]</mark>"
            cells.append(f"<td><pre>{text}</pre></td>")
        rows.append(f"<tr><td>{p}</td>{''.join(cells)}</tr>")
    head = "".join(f"<th>{_e(n)}</th>" for n in ["prompt", *names])
    out.append(f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
    cards = {n: llm_report.failure_card(cs, ["".join(decode(c)) for c in cs], expected) for n, cs in greedy.items()}
    keys = list(next(iter(cards.values())))
    out += [
        "<h3>Failure card</h3>",
        _html_table(["artifact", *keys], [[n, *[str(c[k]) for k in keys]] for n, c in cards.items()]),
    ]
    return out + _presets(ev, decode)


def _presets(ev: Evidence, decode: Any) -> list[str]:
    """The decoding presets' continuations side by side: one table per prompt, artifacts x presets."""
    view = llm_report.preset_texts({n: e.outputs for n, e in ev.evaluations.items()}, decode)
    if view is None:
        return []
    out = ["<h2>Decoding presets on the fixed prompts</h2>", "<ul>"]
    out += [f"<li><code>{_e(n)}</code>: {_e(llm_report.settings_text(s))}</li>" for n, s in view.settings.items()]
    out += ["</ul>", "<p>Each artifact's continuation per preset; gates read the greedy ones only.</p>"]
    names = list(view.settings)
    head = "".join(f"<th>{_e(n)}</th>" for n in ["artifact", *names])
    for prompt, row in zip(view.prompts, view.texts, strict=True):
        body = "".join(
            f"<tr><td>{_e(a)}</td>" + "".join(f"<td><pre>{_e(t.get(n, '–'))}</pre></td>" for n in names) + "</tr>"
            for a, t in row.items()
        )
        out += [
            f"<h3><pre>{_e(prompt)}</pre></h3>",
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
        ]
    return out


def _cards(m: RunManifest, run_dir: Path, ev: Evidence) -> list[str]:
    out = ["<h2>Data card</h2>"]
    card = dict(ev.view.data_card)
    roles = card.pop("roles", {}) or {}
    out.append(_html_table(["field", "value"], [[k, _flat(v)] for k, v in card.items() if v is not None]))
    rows = [[r, d.get("split", ""), str(d.get("samples", "")), d.get("sha256", "")] for r, d in roles.items()]
    rows += [[r, "", "", h] for r, h in m.data.items() if r not in roles]
    out.append(_html_table(["role", "split", "samples", "sha256"], rows))
    out += ["<h2>Model card</h2>", _html_table(["field", "value"], [[k, _flat(v)] for k, v in ev.model.items()])]
    stages = [
        [
            r.name,
            r.artifact.get("stage", ""),
            r.parent or "",
            _param_count(run_dir / r.name),
            _flat(r.artifact.get("config") or {}),
            _flat(dict(r.info)),
        ]
        for r in m.artifacts
    ]
    out.append(_html_table(["artifact", "stage", "from", "parameters", "config", "what it did"], stages))
    if ev.command:
        out.append(f"<p>Rerun: <code>{_e(ev.command)}</code> (cached stages are reused when unchanged).</p>")
    return out


def _param_count(folder: Path) -> str:
    """Parameters of a torch artifact, counted from its safetensors headers (nothing is loaded)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return "–"
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="numpy") as fh:
            total += sum(int(np.prod(fh.get_slice(k).get_shape())) for k in fh.keys())  # noqa: SIM118
    return f"{total:,}"


def _flat(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_flat(v)}" for k, v in value.items() if v is not None)  # unset keys: noise
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_flat(v) for v in value) + "]"
    return str(value)
