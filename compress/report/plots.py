"""Run-level plots: the primary metric vs latency and vs size (one point per artifact, so each stage's
trade-off is visible at a glance), latency vs batch size, decode tokens/s vs prompt length, and the per-layer
widths a prune stage kept."""

from __future__ import annotations

import json
from pathlib import Path

from compress.atomic import atomic_path
from compress.paths import PRUNE_LAYERS_FILE
from compress.records import ArtifactRecord, RunManifest
from compress.report.figures import plain_log_ticks, png_bytes, pyplot


def plot_accuracy_vs_latency(manifest: RunManifest, path: Path) -> None:
    """accuracy_vs_latency.png, the picture report.md shows."""
    data = metric_vs_latency(manifest)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def metric_vs_latency(manifest: RunManifest) -> bytes:
    b = manifest.bench_settings
    xlabel = f"p50 latency at batch {b['batch_sizes'][0]}, {b['threads']} thread(s) [ms, log scale]"
    points = [(rec, rec.bench.latency[0].p50_ms) for rec in manifest.artifacts if rec.bench and rec.bench.latency]
    return _scatter(manifest, points, xlabel, "latency")


def metric_vs_size(manifest: RunManifest) -> bytes:
    points = [(rec, rec.size_bytes / 1e6) for rec in manifest.artifacts if rec.size_bytes]
    return _scatter(manifest, points, "size on disk [MB, log scale]", "size")


def _scatter(manifest: RunManifest, points: list[tuple[ArtifactRecord, float]], xlabel: str, what: str) -> bytes:
    plt = pyplot()
    metric = manifest.metric_names[0]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for rec, x in points:
        y = rec.metric(metric)
        if y is None:
            continue
        ax.scatter([x], [y], s=40)
        backend = f", {rec.bench.backend}" if rec.bench else ""
        label = f"{rec.name} ({rec.artifact['precision']}{backend})"
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_xscale("log")
    plain_log_ticks(ax.xaxis)
    ax.ticklabel_format(axis="y", useOffset=False)  # ppl 999.2 vs 1000.6, not "+1e3" and offsets
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{manifest.pipeline['name']}: {metric} vs {what}")
    return png_bytes(fig)


def latency_vs_batch(manifest: RunManifest) -> bytes | None:
    """p50 latency per item at each batch size, one line per benchmarked artifact; None without benchmarks."""
    recs = [r for r in manifest.artifacts if r.bench is not None and r.bench.latency]
    if not recs:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for rec in recs:
        rows = rec.bench.latency
        ax.plot([r.batch_size for r in rows], [r.p50_ms for r in rows], marker="o", label=rec.name)
    ax.set_xlabel("batch size")
    step = " (causal-lm: one decode step)" if manifest.pipeline.get("family") == "causal-lm" else ""
    ax.set_ylabel(f"p50 latency per batch{step} [ms]", fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r.batch_size for rec in recs for r in rec.bench.latency}))
    ax.xaxis.set_major_formatter("{x:g}")
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return png_bytes(fig)


def decode_vs_prompt(sweep: dict[str, dict[int, float]]) -> bytes:
    """Batch-1 decode tokens/s against prompt length, one line per artifact (`markdown.decode_sweep`)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, row in sweep.items():
        ax.plot(list(row), list(row.values()), marker="o", label=name)
    ax.set_xlabel("prompt length before decoding [tokens, log scale]")
    ax.set_ylabel("decode tokens/s at batch 1")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({n for row in sweep.values() for n in row}))
    ax.xaxis.set_major_formatter("{x:g}")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return png_bytes(fig)


def kept_widths(manifest: RunManifest, run_dir: Path) -> dict[str, bytes]:
    """Per pruned artifact: kept fraction of every layer's width (from its per-layer widths file)."""
    out = {}
    for rec in manifest.artifacts:
        path = run_dir / rec.name / PRUNE_LAYERS_FILE
        if rec.artifact.get("stage") != "prune" or not path.is_file():
            continue
        layers = json.loads(path.read_text())
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(layers)), 3.5), dpi=100)
        ax.bar(range(len(layers)), [lc["after"] / lc["before"] for lc in layers])
        ax.set_xticks(range(len(layers)), [lc["name"] for lc in layers], rotation=75, fontsize=6, ha="right")
        ax.set_ylabel("kept width (fraction)")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{rec.name}: per-layer kept width", fontsize=9)
        out[rec.name] = png_bytes(fig)
    return out
