"""Accuracy vs latency: one point per artifact, so the trade-off of each stage is visible at a glance."""

from __future__ import annotations

from pathlib import Path

from compress.records import RunManifest


def plot_accuracy_vs_latency(manifest: RunManifest, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = manifest.metric_names[0]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for rec in manifest.artifacts:
        y = rec.metric(metric)
        if y is None or rec.bench is None:
            continue
        x = rec.bench.latency[0].p50_ms
        ax.scatter([x], [y], s=40)
        label = f"{rec.name} ({rec.artifact['precision']}, {rec.bench.backend})"
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    b = manifest.bench_settings
    ax.set_xlabel(f"p50 latency at batch {b['batch_sizes'][0]}, {b['threads']} thread(s) [ms, log scale]")
    ax.set_ylabel(metric)
    ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{manifest.pipeline['name']}: {metric} vs latency")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
