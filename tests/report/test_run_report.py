"""report.html and `compress compare` on a real tiny run (TinyCNN on Fashion-MNIST slices, INT8 on CPU)."""

from __future__ import annotations

import base64
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from toys import pipeline_yaml, run_quietly

from compress.cachefiles import load_arrays, read_cached
from compress.cli import main
from compress.report import vision

STAGES = """
  - finetune: {steps: 40, lr: 1.0e-2, batch_size: 32}
  - export: {opset: 17, name: onnx-fp32}
  - quantize: {precision: int8, method: {name: static, calibrator: minmax, samples: 64}, name: int8}"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, fashion_mnist: Path) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    code, _, _ = run_quietly(pipeline_yaml(tmp, fashion_mnist, stages=STAGES), tmp / "runs")
    assert code == 0
    return tmp / "runs" / "toy"


def _evidence(art: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    cached = read_cached(art / "_evaluation.json", None)
    samples = load_arrays(art / "_samples.npz", cached["samples_sha256"])
    return np.load(art / "_predictions.npy", allow_pickle=False), samples


def test_saved_samples_give_a_confusion_matrix_that_matches_the_metrics(run: Path) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    records = {r["artifact"]["name"]: r for r in manifest["artifacts"]}
    preds, samples = _evidence(run / "int8")
    labels = samples["labels"]
    cm = vision.confusion_matrix(labels, preds, 10)
    assert cm.sum() == records["int8"]["evaluation"]["metrics"]["samples"] == 300
    assert 100 * np.trace(cm) / cm.sum() == pytest.approx(records["int8"]["evaluation"]["metrics"]["top1"])
    assert ((samples["confidence"] > 0.1 - 1e-6) & (samples["confidence"] <= 1.0 + 1e-6)).all()  # 10-class softmax max


def test_flipped_examples_are_really_flipped(run: Path) -> None:
    base, samples = _evidence(run / "finetune")
    now, _ = _evidence(run / "int8")
    labels = samples["labels"]
    flips = vision.flipped(labels, base, now)
    assert len(flips) > 0  # INT8 on this toy flips some of 300 samples (6 when measured)
    assert (base[flips] == labels[flips]).all() and (now[flips] != labels[flips]).all()


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.external: list[str] = []
        self.tables = 0
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tables += tag == "table"
        self.scripts += tag == "script"
        if tag == "img":
            self.images.append(a.get("src") or "")
        for key in ("href", "src"):
            if a.get(key) and not a[key].startswith(("data:", "#")):
                self.external.append(a[key])


def test_report_html_is_one_self_contained_file_with_the_pictures(run: Path) -> None:
    text = (run / "report.html").read_text()
    page = _Page()
    page.feed(text)
    page.close()
    assert page.external == []  # nothing fetched: every image inlined
    assert len(page.images) >= 7  # metric vs latency and size, batch, reliability, 2 confusions, flips
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.tables >= 6 and page.scripts == 1
    assert "right→wrong" in text and "ECE" in text and "Data card" in text and "MIT (Expat)" in text
    assert f"compress run {run.parent.parent / 'toy.yaml'}" in text


def _compare(a: Path, b: Path, *fail_on: str) -> int:
    return main(["compare", str(a), str(b), *[f"--fail-on={t}" for t in fail_on]])


def test_compare_exit_code_follows_the_threshold(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    top1 = {
        r["artifact"]["name"]: (r.get("evaluation") or {}).get("metrics", {}).get("top1") for r in manifest["artifacts"]
    }
    drop = top1["finetune"] - top1["int8"]  # int8 against finetune: B = int8
    a, b = run / "finetune", run / "int8"
    assert _compare(a, b, f"top1_drop>{drop + 0.01}") == 0
    assert _compare(a, b, f"top1_drop>{drop - 0.01}") == 1
    assert _compare(a, b, f"top1_drop>={drop - 0.01}", "flips_pct>100") == 1  # one breach suffices
    assert "FAIL top1_drop" in capsys.readouterr().out
    assert _compare(run, run, "top1_drop>0", "flips_pct>0") == 0  # a run against itself: nothing moved


def test_compare_reports_flips_between_two_artifacts(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, samples = _evidence(run / "finetune")
    now, _ = _evidence(run / "int8")
    assert _compare(run / "finetune", run / "int8") == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| finetune | int8 |"))
    right_to_wrong = int(((base == samples["labels"]) & (now != samples["labels"])).sum())
    assert row.split("|")[-3].strip() == str(right_to_wrong)
    assert row.split("|")[-4].strip() == f"{100 * (base != now).mean():.2f}"


@pytest.mark.parametrize(
    ("fail_on", "message"),
    [
        ("top1_drop=>0.2", "expected NAME OP NUMBER"),
        ("top1_drop>", "expected NAME OP NUMBER"),
        ("ppl>1", "no value 'ppl'"),
    ],
)
def test_compare_bad_fail_on_is_exit_2(
    run: Path, capsys: pytest.CaptureFixture[str], fail_on: str, message: str
) -> None:
    assert _compare(run, run, fail_on) == 2
    assert message in capsys.readouterr().err


def test_compare_refuses_damaged_predictions(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "toy"
    shutil.copytree(run, copy)
    with open(copy / "int8" / "_predictions.npy", "r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x07")
    assert _compare(run, copy) == 2
    assert "int8/_predictions.npy: missing or fails its sha256" in capsys.readouterr().err


def test_damaged_samples_are_re_evaluated(run: Path, tmp_path: Path, fashion_mnist: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(run, runs / "toy")
    (runs / "toy" / "int8" / "_samples.npz").write_bytes(b"not an npz")
    code, _, _ = run_quietly(pipeline_yaml(tmp_path, fashion_mnist, stages=STAGES), runs, "--no-bench")
    assert code == 0
    _, samples = _evidence(runs / "toy" / "int8")
    assert samples["labels"].shape == (300,)


def test_compare_exit_4_when_a_threshold_cannot_be_checked(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "toy"
    shutil.copytree(run, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for record in manifest["artifacts"]:
        record.pop("bench", None)  # as after `--no-bench` without cached results
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert _compare(run, copy, "latency_rise_pct>10") == 4
    assert _compare(run, copy, "latency_rise_pct>10", "top1_drop>-1000") == 1  # a breach outranks it


def test_a_picture_that_fails_is_a_warning_and_the_rest_is_drawn(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from compress.families.base import Evaluation
    from compress.records import RunManifest
    from compress.report.html import Evidence, render_html

    manifest = RunManifest.from_json(json.loads((run / "manifest.json").read_text()))
    evals = {}
    for name in ("finetune", "int8"):
        preds, samples = _evidence(run / name)
        evals[name] = Evaluation({}, preds, {}, samples)

    def broken(*args: object) -> bytes:
        raise RuntimeError("no fonts")

    monkeypatch.setattr(vision, "confusion_figure", broken)
    page, problems = render_html(manifest, run, Evidence(evaluations=evals))
    assert problems == ["vision: RuntimeError: no fonts"]
    assert "The vision section could not be drawn: no fonts" in page and "Model card" in page
