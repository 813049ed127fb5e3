"""More than one text: the fortunes source, per-text evaluation windows, the calibration mix, per-text figures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from compress.errors import ConfigError
from compress.families.causal_lm.fortunes import DEFAULT_FOLDER, TECHNICAL, fortune_records, read_fortunes
from compress.families.causal_lm.options import TextDataOptions, TextSource
from compress.families.causal_lm.task import (
    calibration_shares,
    mix_calibration,
    read_text,
    split_windows,
    token_hash,
    tokenize_windows,
)


def _fortune_folder(tmp: Path) -> Path:
    """A fortune folder as Debian lays it out: NAME, NAME.dat (strfile's index), NAME.u8 -> NAME."""
    folder = tmp / "fortunes"
    folder.mkdir()
    files = {
        "b-prose": "bee one\n%\nbee two\nsecond line\n%\n%\nbee three\n%\n",
        "a-prose": "ay one\n%\nay two",
        "computers": "a computing joke\n%\n",
        "notes": "no .dat beside me: not a fortune file",
    }
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
        if name != "notes":
            (folder / f"{name}.dat").write_bytes(b"\0" * 24)
            (folder / f"{name}.u8").symlink_to(name)
    return folder


def test_fortunes_are_records_between_percent_lines_interleaved_across_files(tmp_path: Path) -> None:
    folder = _fortune_folder(tmp_path)
    assert fortune_records(folder / "b-prose") == ["bee one", "bee two\nsecond line", "bee three"]
    assert "computers" in TECHNICAL  # left out by default; `notes` has no index; the .u8 links are not read twice
    assert read_fortunes(TextSource(kind="fortunes", path=folder)) == [
        "ay one",
        "bee one",
        "ay two",
        "bee two\nsecond line",
        "bee three",
    ]
    assert read_text(TextSource(kind="fortunes", path=folder, max_records=3)) == "ay one\n\nbee one\n\nay two"
    chosen = TextSource(kind="fortunes", path=folder, files=("computers", "b-prose"))
    assert read_fortunes(chosen) == ["bee one", "a computing joke", "bee two\nsecond line", "bee three"]


def test_fortune_errors_name_the_key_and_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _fortune_folder(tmp_path)
    with pytest.raises(ConfigError, match=r"data\.texts\.x\.files: \['absent'\] not among the fortune files"):
        read_text(TextSource(kind="fortunes", path=folder, files=("absent",)), "data.texts.x")
    with pytest.raises(ConfigError, match=r"data\.text\.path: '.*nowhere': no such folder"):
        read_text(TextSource(kind="fortunes", path=tmp_path / "nowhere"))
    monkeypatch.setattr("compress.families.causal_lm.fortunes.DEFAULT_FOLDER", tmp_path / "not-installed")
    with pytest.raises(ConfigError, match=r"install the Debian package 'fortunes' \(`apt-get install fortunes`"):
        read_text(TextSource(kind="fortunes"))
    with pytest.raises(ConfigError, match="text source fortunes takes no field"):
        TextSource(kind="fortunes", field="body")
    with pytest.raises(ConfigError, match=r"text source pydoc takes no files \(fortunes only\)"):
        TextSource(kind="pydoc", files=("wisdom",))


@pytest.mark.skipif(not DEFAULT_FOLDER.is_dir(), reason="Debian package fortunes not installed (scripts/setup.sh)")
def test_the_installed_fortunes_are_prose_in_a_stable_order() -> None:
    from llm_toys import tiny_tokenizer

    text = read_text(TextSource(kind="fortunes"))
    assert text == read_text(TextSource(kind="fortunes")) and len(text) > 1_000_000
    assert "Mark Twain" in text and "def " not in text[:5000]
    windows = tokenize_windows(text, tiny_tokenizer(), window=512)
    assert len(windows) >= 8 + 16  # evaluation + calibration of the README's pipelines, and far more


# -- the calibration mix ------------------------------------------------------------------------------------


def _texts() -> dict[str, np.ndarray]:
    """Three texts of distinct token ids (text t, window w, position p -> t*10000 + w*10 + p)."""
    sizes = {"text": 30, "b": 20, "c": 12}
    return {
        name: (t * 10000 + np.arange(n)[:, None] * 10 + np.arange(8)[None, :]).astype(np.int64)
        for t, (name, n) in enumerate(sizes.items())
    }


def test_calibration_is_drawn_round_robin_and_never_from_evaluation_windows() -> None:
    texts = _texts()
    assert calibration_shares(["text", "b", "c"], 16) == {"text": 6, "b": 5, "c": 5}
    splits = mix_calibration(texts, ["text", "b", "c"], evaluation=4, calibration=16)
    assert splits.calibration_texts[:4] == ("text", "b", "c", "text")
    assert [splits.calibration_texts.count(n) for n in ("text", "b", "c")] == [6, 5, 5]
    for t, name in enumerate(texts):
        np.testing.assert_array_equal(splits.evaluation[name], texts[name][:4])  # each text's first windows
        drawn = splits.calibration[np.asarray(splits.calibration_texts) == name]
        np.testing.assert_array_equal(drawn, texts[name][4 : 4 + len(drawn)])  # in order, right after them
        assert not set(drawn.ravel()) & set(splits.evaluation[name].ravel())
        assert (drawn // 10000 == t).all()


def test_one_text_calibrates_exactly_as_before() -> None:
    texts = {"text": _texts()["text"]}
    splits = mix_calibration(texts, ["text"], evaluation=8, calibration=16)
    before = split_windows(texts["text"], evaluation=8, calibration=16)
    assert token_hash(splits.calibration) == token_hash(before.calibration)  # cache keys of existing runs hold
    assert token_hash(splits.evaluation["text"]) == token_hash(before.evaluation)


def test_a_text_too_short_for_its_share_is_named() -> None:
    with pytest.raises(ConfigError, match=r"text 'c': asked for 10 evaluation \+ 3 calibration windows; only 12"):
        mix_calibration(_texts(), ["text", "b", "c"], evaluation=10, calibration=9)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"calibration_texts": ["text", "x"]}, r"data\.calibration_texts = \['text', 'x'\]: unknown \['x'\]"),
        ({"texts": {"b": {"kind": "pydoc"}}, "calibration_texts": ["b", "b"]}, "a text listed twice"),
        ({"calibration_texts": []}, "empty"),
        ({"texts": {"text": {"kind": "pydoc"}}}, r"data\.texts\.text: a text name is lowercase"),
        ({"texts": {"Big Text": {"kind": "pydoc"}}}, r"data\.texts\.Big Text: a text name is lowercase"),
        (
            {"texts": {"b": {"kind": "pydoc"}}, "calibration_texts": ["text", "b"], "calibration_windows": 1},
            "expected at least one calibration window per text",
        ),
    ],
)
def test_bad_text_options_say_which_key_and_what_was_expected(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TextDataOptions(**data)


# -- through the runner: per-text figures in the manifest, report.md and inspect ----------------------------


def test_each_text_gets_its_perplexity_and_rise_in_manifest_report_and_inspect(tmp_path: Path, capsys) -> None:
    import torch
    from llm_toys import tiny_pipeline
    from toys import run_quietly
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.cli import EXIT_OK, main

    other = tmp_path / "other.txt"
    other.write_text(" ".join(["while", "if", "else", "the", "return"] * 200), encoding="utf-8")
    data = (
        f'{{text: {{kind: pydoc, max_records: 4}}, texts: {{other: {{kind: text, path: "{other}"}}}}, '
        "calibration_texts: [text, other], window: 32, evaluation_windows: 2, calibration_windows: 4, "
        "generation_tokens: 2, prompts: [The for]}"
    )
    stages = "\n  - quantize: {precision: int4, method: rtn, group_size: 32, name: int4}"
    pipeline = tiny_pipeline(tmp_path, "texts", stages, data=data)
    code, manifest, records = run_quietly(pipeline, tmp_path / "runs", "--no-bench")
    assert code == EXIT_OK
    assert manifest["metric_names"] == ["ppl", "ppl:other"]
    assert "calibration windows: 2 from `text`, 2 from `other` (round-robin)" in " ".join(manifest["notes"])

    # the source's ppl:other is the model's perplexity on the other text's first two windows
    folder = tmp_path / "model"
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    windows = torch.from_numpy(tokenize_windows(other.read_text(), tok, window=32)[:2])
    with torch.no_grad():
        loss = model(windows, labels=windows).loss  # mean next-token NLL over both windows
    source, int4 = records["source"]["evaluation"], records["int4"]["evaluation"]
    assert source["metrics"]["ppl:other"] == pytest.approx(float(torch.exp(loss)), rel=1e-4)
    assert source["metrics"]["ppl:other"] != pytest.approx(source["metrics"]["ppl"], rel=1e-3)
    rise = 100 * (int4["metrics"]["ppl:other"] / source["metrics"]["ppl:other"] - 1)
    assert int4["vs_baseline"]["ppl_rise_pct:other"] == pytest.approx(rise, abs=1e-9)
    assert int4["vs_parent"]["ppl_rise_pct:other"] == pytest.approx(rise, abs=1e-9)  # its parent is the source

    report = (tmp_path / "runs" / "texts" / "report.md").read_text()
    assert "## Perplexity per text" in report
    assert f"| int4 | {int4['metrics']['ppl']:.3f} |" in report
    assert main(["inspect", str(tmp_path / "runs" / "texts"), "--table", "texts"]) == EXIT_OK
    table = capsys.readouterr().out
    assert "ppl other" in table and f"{int4['metrics']['ppl:other']:.3f} | {rise:+.2f} | {rise:+.2f} |" in table


def test_without_texts_the_data_hashes_are_those_of_a_single_text(tmp_path: Path) -> None:
    """Existing pipelines keep their cache keys: the calibration hash is that of windows 8..24 of the text."""
    from llm_toys import tiny_pipeline

    from compress.config import load_pipeline
    from compress.families.causal_lm.adapter import CausalLMAdapter
    from compress.progress import Reporter

    pipeline = tiny_pipeline(tmp_path, "plain", "\n  - prune: {mlp_ratio: 0.5}", data="{window: 16}")
    cfg = load_pipeline(pipeline)
    adapter = CausalLMAdapter(
        cfg.model, cfg.data, base_dir=tmp_path, cache_dir=tmp_path / "cache", reporter=Reporter(quiet=True)
    )
    windows = tokenize_windows(read_text(TextSource(kind="pydoc")), adapter.tokenizer, window=16)
    hashes = adapter.data_hashes()
    assert hashes["calibration"] == token_hash(windows[8:24])
    assert hashes["train"] == token_hash(windows[8:])
    assert adapter.metric_names == ("ppl",) and adapter.text_windows == {}
    assert json.dumps(adapter.report_view().data_card["evaluation"]["text"]) == '{"kind": "pydoc"}'


def test_a_texts_path_that_reads_nothing_is_located_before_any_work(tmp_path: Path) -> None:
    from llm_toys import tiny_pipeline

    from compress.config import load_pipeline

    data = f'{{texts: {{other: {{kind: text, path: "{tmp_path}/absent.txt"}}}}, window: 16}}'
    pipeline = tiny_pipeline(tmp_path, "badtexts", "\n  - prune: {mlp_ratio: 0.5}", data=data)
    with pytest.raises(ConfigError) as err:
        load_pipeline(pipeline)
    assert re.search(r"data\.texts\.other\.path.*absent\.txt': no such file", str(err.value)), str(err.value)


def test_fortunes_not_installed_is_a_validate_error_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llm_toys import tiny_pipeline

    from compress.config import load_pipeline

    monkeypatch.setattr("compress.families.causal_lm.fortunes.DEFAULT_FOLDER", tmp_path / "not-installed")
    data = "{texts: {prose: {kind: fortunes}}, calibration_texts: [prose], window: 16}"
    pipeline = tiny_pipeline(tmp_path, "nofortunes", "\n  - prune: {mlp_ratio: 0.5}", data=data)
    with pytest.raises(ConfigError) as err:
        load_pipeline(pipeline)
    assert re.search(
        r"data\.texts\.prose: kind fortunes reads .*not-installed.*apt-get install fortunes", str(err.value)
    )
