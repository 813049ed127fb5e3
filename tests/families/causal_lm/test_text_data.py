"""Text sources, windows, the non-overlapping split and the token hash."""

from __future__ import annotations

import json

import numpy as np
import pytest
from llm_toys import tiny_tokenizer

from compress.errors import ConfigError
from compress.families.causal_lm.options import TextSource
from compress.families.causal_lm.task import read_text, split_windows, token_hash, tokenize_windows


def test_pydoc_text_is_sorted_and_stable():
    from pydoc_data.topics import topics

    text = read_text(TextSource(kind="pydoc"))
    first = sorted(topics)[0]
    assert text.startswith(topics[first]) and text == read_text(TextSource(kind="pydoc"))
    assert len(text) > 100_000
    assert read_text(TextSource(kind="pydoc", max_records=2)).count("\n\n") >= 1


def test_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    assert read_text(TextSource(kind="text", path=tmp_path / "a.txt")) == "hello world"
    rows = [{"text": "one"}, {"text": "two", "other": 1}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_text(TextSource(kind="jsonl", path=tmp_path / "a.jsonl", field="text")) == "one\n\ntwo"
    with pytest.raises(ConfigError, match=r"a.jsonl:1: no field 'body'; record has \['text'\]"):
        read_text(TextSource(kind="jsonl", path=tmp_path / "a.jsonl", field="body"))
    with pytest.raises(ConfigError, match="needs field"):
        TextSource(kind="jsonl", path=tmp_path / "a.jsonl")
    with pytest.raises(ConfigError, match="absent.txt': no such file, folder or glob match"):
        read_text(TextSource(kind="text", path=tmp_path / "absent.txt"))


def test_windows_are_consecutive_slices_of_the_stream():
    tok = tiny_tokenizer()
    text = read_text(TextSource(kind="pydoc", max_records=5))
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"])
    windows = tokenize_windows(text, tok, window=64)
    assert windows.shape == (len(ids) // 64, 64) and windows.dtype == np.int64
    np.testing.assert_array_equal(windows.reshape(-1), ids[: windows.size])
    assert tokenize_windows(text, tok, window=64, max_windows=3).shape == (3, 64)
    with pytest.raises(ConfigError, match="fewer than one window"):
        tokenize_windows("a b", tok, window=64)


@pytest.mark.parametrize("seed", [None, 0, 1])
def test_split_never_overlaps(seed):
    windows = np.arange(40 * 8).reshape(40, 8)  # every window holds distinct token ids
    split = split_windows(windows, evaluation=10, calibration=20, seed=seed)
    assert split.evaluation_index == tuple(range(10))
    assert not set(split.evaluation.ravel()) & set(split.calibration.ravel())
    assert len(split.calibration) == 20 and min(split.calibration_index) >= 10
    if seed is None:
        assert split.calibration_index == tuple(range(10, 30))
    else:
        assert (
            split.calibration_index
            == split_windows(windows, evaluation=10, calibration=20, seed=seed).calibration_index
        )
    with pytest.raises(ConfigError, match="only 40 available"):
        split_windows(windows, evaluation=30, calibration=11)


def test_token_hash():
    a = np.arange(12).reshape(3, 4)
    assert token_hash(a) == token_hash(a.astype(np.int32)) and len(token_hash(a)) == 64
    assert token_hash(a) != token_hash(a.reshape(4, 3))  # shape is part of the hash
    b = a.copy()
    b[2, 3] += 1
    assert token_hash(a) != token_hash(b)
