"""`compress compare RUN_A RUN_B`: every artifact the two runs share (or two artifact folders), their metrics,
size and latency with deltas (B minus A), prediction flips, and `--fail-on` thresholds for CI.

Everything read is verified: manifest.json through `compress.records`, each artifact's cached evaluation by
its checksum (and its metrics against the manifest's), its predictions and per-sample arrays by sha256.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compress.artifact import EVAL_FILE, MANIFEST, PREDICTIONS_FILE, SAMPLES_FILE
from compress.cachefiles import load_arrays, load_predictions, read_cached
from compress.paths import MANIFEST_FILE
from compress.records import ArtifactRecord, RunManifest


class CompareInputError(ValueError):
    """A run folder, artifact folder or --fail-on that `compress compare` cannot use (exit 2)."""


OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
_THRESHOLD = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*(-?[0-9]+(?:\.[0-9]*)?(?:[eE]-?[0-9]+)?)\s*$")


@dataclass(frozen=True)
class Threshold:
    """`--fail-on NAME OP NUMBER`: breached when NAME (a delta of run B against run A) OP NUMBER holds."""

    name: str
    op: str
    bound: float

    @classmethod
    def parse(cls, text: str) -> Threshold:
        match = _THRESHOLD.match(text)
        if match is None:
            raise CompareInputError(
                f"--fail-on {text!r}: expected NAME OP NUMBER with OP one of >, >=, <, <= "
                "(e.g. --fail-on 'top1_drop>0.2'; quote it in a shell)"
            )
        return cls(match[1], match[2], float(match[3]))

    def breached(self, value: float) -> bool:
        return OPERATORS[self.op](value, self.bound)

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.bound:g}"


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a finished run's manifest, and which of its artifacts are compared."""

    run_dir: Path
    manifest: RunManifest
    artifact: str | None  # one artifact folder was named; None: the whole run


@dataclass(frozen=True)
class Row:
    """One compared pair: A's and B's artifact names and the values any --fail-on may name."""

    a: str
    b: str
    values: Mapping[str, float | None]


def open_side(path: Path) -> Side:
    """A run folder (holds manifest.json) or one of its artifact folders (holds artifact.json)."""
    if (path / MANIFEST_FILE).is_file():
        run_dir, artifact = path, None
    elif (path / MANIFEST).is_file() and (path.parent / MANIFEST_FILE).is_file():
        run_dir, artifact = path.parent, path.name
    else:
        raise CompareInputError(
            f"{path}: neither a run folder (with {MANIFEST_FILE}) nor an artifact folder of a run (with {MANIFEST})"
        )
    file = run_dir / MANIFEST_FILE
    try:
        manifest = RunManifest.from_json(json.loads(file.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CompareInputError(f"{file}: not a readable manifest ({type(exc).__name__}: {exc})") from None
    if manifest.verdict is None:
        raise CompareInputError(f"{file}: the run has not finished (no verdict); compare finished runs")
    if artifact is not None and manifest.record(artifact) is None:
        raise CompareInputError(f"{path}: no artifact '{artifact}' in {file}")
    return Side(run_dir, manifest, artifact)


def pairs(a: Side, b: Side) -> list[tuple[str, str]]:
    if (a.artifact is None) != (b.artifact is None):
        raise CompareInputError("compare two run folders, or two artifact folders, not one of each")
    if a.artifact is not None and b.artifact is not None:
        return [(a.artifact, b.artifact)]
    # an untrained head (not task-ready) is neither evaluated nor benchmarked: nothing to compare
    names_b = {r.name for r in b.manifest.artifacts if r.artifact.get("task_ready", True)}
    shared = [(r.name, r.name) for r in a.manifest.artifacts if r.name in names_b]
    if not shared:
        raise CompareInputError(f"{a.run_dir} and {b.run_dir} share no artifact name")
    return shared


def verified_evidence(side: Side, name: str) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """(predictions, per-sample arrays) of an evaluated artifact, verified; None if it was not evaluated.
    A damaged or altered file is an error naming it."""
    record = side.manifest.record(name)
    if record is None or record.evaluation is None:
        return None
    folder = side.run_dir / name
    cached = read_cached(folder / EVAL_FILE, None)
    if cached is None:
        raise CompareInputError(f"{folder / EVAL_FILE}: missing or fails its checksum; rerun the pipeline")
    if dict(cached.get("metrics", {})) != dict(record.evaluation.metrics):
        raise CompareInputError(f"{folder / EVAL_FILE}: metrics differ from {side.run_dir / MANIFEST_FILE}")
    predictions = load_predictions(folder / PREDICTIONS_FILE, cached.get("predictions_sha256"))
    if predictions is None:
        raise CompareInputError(f"{folder / PREDICTIONS_FILE}: missing or fails its sha256; rerun the pipeline")
    samples = {}
    if cached.get("samples_sha256") is not None:  # runs from before per-sample arrays have none
        samples = load_arrays(folder / SAMPLES_FILE, cached["samples_sha256"])
        if samples is None:
            raise CompareInputError(f"{folder / SAMPLES_FILE}: missing or fails its sha256; rerun the pipeline")
    return predictions, samples


def row_values(a: Side, b: Side, name_a: str, name_b: str) -> dict[str, float | None]:
    """Every number of the pair: metrics and their deltas, size, latency, flips (B against A)."""
    ra, rb = a.manifest.record(name_a), b.manifest.record(name_b)
    assert ra is not None and rb is not None  # pairs() only yields recorded names
    out: dict[str, float | None] = {}
    for metric in dict.fromkeys([*a.manifest.metric_names, *b.manifest.metric_names]):
        va, vb = ra.metric(metric), rb.metric(metric)
        out[f"{metric}_a"], out[f"{metric}_b"] = va, vb
        both = va is not None and vb is not None
        out[f"{metric}_drop"] = va - vb if both else None
        out[f"{metric}_rise"] = vb - va if both else None
        out[f"{metric}_rise_pct"] = 100.0 * (vb / va - 1.0) if both and va else None
    out["size_mb_a"], out["size_mb_b"] = ra.size_bytes / 1e6, rb.size_bytes / 1e6
    out["size_rise_pct"] = 100.0 * (rb.size_bytes / ra.size_bytes - 1.0) if ra.size_bytes else None
    pa, pb = _p50(ra), _p50(rb)
    out["p50_ms_a"], out["p50_ms_b"] = pa, pb
    out["latency_rise_pct"] = 100.0 * (pb / pa - 1.0) if pa and pb else None
    out.update(_flips(verified_evidence(a, name_a), verified_evidence(b, name_b)))
    return out


def _p50(record: ArtifactRecord) -> float | None:
    return record.bench.latency[0].p50_ms if record.bench and record.bench.latency else None


def _flips(ea: tuple | None, eb: tuple | None) -> dict[str, float | None]:
    """Share of predictions that differ; with labels, how many went right->wrong and wrong->right."""
    none = {"flips_pct": None, "right_to_wrong": None, "wrong_to_right": None}
    if ea is None or eb is None or ea[0].shape != eb[0].shape:
        return none
    (pa, sa), (pb, _) = ea, eb
    out: dict[str, float | None] = {**none, "flips_pct": 100.0 * float((pa != pb).mean())}
    labels = sa.get("labels")
    if labels is not None and labels.shape == pa.shape:
        out["right_to_wrong"] = float(((pa == labels) & (pb != labels)).sum())
        out["wrong_to_right"] = float(((pa != labels) & (pb == labels)).sum())
    return out


def compare_sides(a: Side, b: Side) -> list[Row]:
    return [Row(x, y, row_values(a, b, x, y)) for x, y in pairs(a, b)]


def check(rows: Sequence[Row], thresholds: Sequence[Threshold]) -> tuple[list[str], list[str]]:
    """(breaches, unchecked): a threshold naming an unknown value is an input error; one whose value is
    missing on a pair (not evaluated, not benchmarked) cannot be checked."""
    known = dict.fromkeys(k for r in rows for k in r.values)
    breaches, unchecked = [], []
    for t in thresholds:
        if t.name not in known:
            allowed = ", ".join(k for k in known if not k.endswith(("_a", "_b")))
            raise CompareInputError(f"--fail-on {t}: no value '{t.name}'; allowed: {allowed}")
        for r in rows:
            value = r.values.get(t.name)
            if value is None:
                unchecked.append(f"{t} on {r.b}: not measured on both sides")
            elif t.breached(value):
                breaches.append(f"{t} on {r.b}: {t.name} = {value:.4g}")
    return breaches, unchecked


def render(a: Side, b: Side, rows: Sequence[Row]) -> str:
    """A markdown table: per pair, each metric A -> B with its delta, size, p50 latency and flips."""
    metrics = list(dict.fromkeys([*a.manifest.metric_names, *b.manifest.metric_names]))
    header = ["A", "B", *[f"{m} A → B (Δ)" for m in metrics], "size MB A → B", "p50 ms A → B", "flips %", "r→w", "w→r"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        v = r.values
        cells = [r.a, r.b]
        cells += [_arrow(v[f"{m}_a"], v[f"{m}_b"], v[f"{m}_rise"]) for m in metrics]
        cells += [_arrow(v["size_mb_a"], v["size_mb_b"], None), _arrow(v["p50_ms_a"], v["p50_ms_b"], None)]
        cells += [_num(v["flips_pct"]), _num(v["right_to_wrong"], ".0f"), _num(v["wrong_to_right"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    head = f"A: {a.run_dir} ({a.manifest.verdict})  B: {b.run_dir} ({b.manifest.verdict}); Δ = B − A"
    return head + "\n\n" + "\n".join(lines) + "\n"


def _num(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _arrow(a: float | None, b: float | None, delta: float | None) -> str:
    text = f"{_num(a)} → {_num(b)}"
    return text + (f" ({delta:+.2f})" if delta is not None else "")
