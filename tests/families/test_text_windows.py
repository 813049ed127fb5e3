"""causal-lm text: windows and prompts follow the tokenizer's BOS rule; own text from files, folders, globs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from compress.errors import ConfigError
from compress.families.causal_lm.options import TextSource
from compress.families.causal_lm.task import bos_note, bos_token, encode_prompt, read_text, tokenize_windows

pytest.importorskip("transformers")

TEXT = " ".join(["the for a b c"] * 40)  # 200 words, one token each


def _tokenizer(**kwargs):
    """A word-level tokenizer with a BOS token; `add_bos_token` / `add_eos_token` as a Gemma-style one has."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<eos>", "<bos>", "the", "for", "a", "b", "c"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", bos_token="<bos>", **kwargs
    )


def test_bos_is_detected_from_the_tokenizers_own_encoding() -> None:
    assert bos_token(_tokenizer()) is None
    assert bos_token(_tokenizer(add_bos_token=True)) == 3
    assert bos_note(_tokenizer(add_bos_token=True)).startswith("windows start with BOS 3")
    assert bos_note(_tokenizer()).startswith("no BOS: the tokenizer adds none")


def test_windows_of_a_bos_tokenizer_are_bos_then_window_minus_one_stream_tokens() -> None:
    plain = tokenize_windows(TEXT, _tokenizer(), window=8)
    stream = plain.reshape(-1)  # the token stream itself: no BOS anywhere
    assert plain.shape == (25, 8) and 3 not in stream
    with_bos = tokenize_windows(TEXT, _tokenizer(add_bos_token=True), window=8)
    assert with_bos.shape == (28, 8)  # 200 // 7 windows
    assert (with_bos[:, 0] == 3).all()
    np.testing.assert_array_equal(with_bos[:, 1:].reshape(-1), stream[: 28 * 7])


def test_prompts_get_the_tokenizers_bos_and_never_a_trailing_eos() -> None:
    assert encode_prompt(_tokenizer(), "the for") == [4, 5]
    assert encode_prompt(_tokenizer(add_bos_token=True), "the for") == [3, 4, 5]
    assert encode_prompt(_tokenizer(add_bos_token=True, add_eos_token=True), "the for") == [3, 4, 5]


# -- through the adapter and the runner -----------------------------------------------------------------


def _folder(tmp: Path, bos: bool) -> Path:
    from llm_toys import tiny_llama, tiny_tokenizer

    folder = tmp / ("bos" if bos else "plain")
    tiny_llama(tie=True).save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    if bos:  # the toy's tokenizer prepending a BOS (id 2, shared with EOS as GPT-2's is)
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer.backend_tokenizer,
            pad_token="<pad>",
            unk_token="<unk>",
            eos_token="<eos>",
            bos_token="<eos>",
            add_bos_token=True,
        )
    tokenizer.save_pretrained(folder)
    return folder


def _pipeline(tmp: Path, name: str, folder: Path, prompts: str = '["The for statement"]') -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(f"""name: {name}
model: {{family: causal-lm, source: "hf:{folder}"}}
data: {{window: 16, evaluation_windows: 2, calibration_windows: 1, generation_tokens: 2, prompts: {prompts}}}
stages:
  - prune: {{mlp_ratio: 0.5}}
""")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[bool, Path]:
    tmp = tmp_path_factory.mktemp("bos-models")
    return {bos: _folder(tmp, bos) for bos in (False, True)}


def test_the_report_says_how_windows_start_and_prompts_are_part_of_the_evaluation_key(folders, tmp_path) -> None:
    from toys import run_quietly

    from compress.cli import EXIT_OK

    notes, hashes = {}, {}
    for bos, folder in folders.items():
        code, manifest, _ = run_quietly(_pipeline(tmp_path, f"w{int(bos)}", folder), tmp_path / "runs", "--no-bench")
        assert code == EXIT_OK
        notes[bos], hashes[bos] = " ".join(manifest["notes"]), manifest["data"]["evaluation"]
    assert "windows start with BOS 2" in notes[True] and "no BOS" in notes[False]
    assert "windows start with BOS 2" in (tmp_path / "runs" / "w1" / "report.md").read_text()
    assert hashes[True] != hashes[False]
    # another prompt is another evaluation: its cached figures are not reused
    again = _pipeline(tmp_path, "w0", folders[False], prompts='["def fibonacci"]')
    code, manifest, _ = run_quietly(again, tmp_path / "runs", "--no-bench")
    assert code == EXIT_OK and manifest["data"]["evaluation"] != hashes[False]


def test_adapter_windows_and_prompts_start_with_bos(folders) -> None:
    from compress.families.causal_lm.adapter import CausalLMAdapter
    from compress.families.causal_lm.options import CausalLMModelOptions, TextDataOptions
    from compress.progress import Reporter

    adapter = CausalLMAdapter(
        CausalLMModelOptions(source=f"hf:{folders[True]}"),
        TextDataOptions(window=16, evaluation_windows=2, calibration_windows=1, prompts=("The for",)),
        base_dir=Path.cwd(),
        cache_dir=folders[True].parent / "cache",
        reporter=Reporter(quiet=True),
    )
    for role in ("evaluation", "calibration", "train"):
        assert (adapter.windows[role][:, 0] == 2).all(), role
    assert adapter.prompt_ids[0][0] == 2


# -- own text ---------------------------------------------------------------------------------------------


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "b.md").write_text("bee one\n\nbee two\n", encoding="utf-8")
    (tmp_path / "docs" / "a.txt").write_text("ay one\n\n\nay two\n\nay three", encoding="utf-8")
    (tmp_path / "docs" / "sub" / "c.txt").write_text("sea", encoding="utf-8")
    (tmp_path / "docs" / "skip.json").write_text("{}", encoding="utf-8")
    (tmp_path / "rows").mkdir()
    for i in (1, 2):
        lines = [json.dumps({"body": f"row {i}.{j}"}) for j in range(3)]
        (tmp_path / "rows" / f"part{i}.jsonl").write_text("\n".join(lines), encoding="utf-8")
    return tmp_path


def test_a_folder_reads_its_text_files_in_order_and_max_records_counts_paragraphs(corpus: Path) -> None:
    folder = corpus / "docs"
    assert (
        read_text(TextSource(kind="text", path=folder))
        == "ay one\n\n\nay two\n\nay three\n\nbee one\n\nbee two\n\n\nsea"
    )
    assert read_text(TextSource(kind="text", path=folder, max_records=4)) == "ay one\n\nay two\n\nay three\n\nbee one"
    assert read_text(TextSource(kind="text", path=folder / "a.txt", max_records=2)) == "ay one\n\nay two"


def test_globs_and_jsonl_folders_honour_max_records_across_files(corpus: Path) -> None:
    assert read_text(TextSource(kind="text", path=corpus / "docs" / "**" / "*.txt")).endswith("ay three\n\nsea")
    rows = read_text(TextSource(kind="jsonl", path=corpus / "rows", field="body", max_records=4))
    assert rows.split("\n\n") == ["row 1.0", "row 1.1", "row 1.2", "row 2.0"]
    glob = read_text(TextSource(kind="jsonl", path=corpus / "rows" / "part2*", field="body"))
    assert glob.split("\n\n") == ["row 2.0", "row 2.1", "row 2.2"]
    assert read_text(TextSource(kind="pydoc", max_records=1)).count("\n\n") < read_text(
        TextSource(kind="pydoc", max_records=3)
    ).count("\n\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{kind: text, path: "{root}/docs/*.rst"}', "the glob matches no file"),
        ('{kind: text, path: "{root}/rows"}', "the folder has no *.txt / *.md file"),
        ('{kind: jsonl, path: "{root}/docs", field: body}', "the folder has no *.jsonl file"),
        ('{kind: text, path: "{root}/absent"}', "no such file, folder or glob match"),
    ],
)
def test_a_text_path_that_reads_nothing_is_a_located_validate_error(corpus: Path, text: str, message: str) -> None:
    from llm_toys import tiny_pipeline

    from compress.config import load_pipeline

    data = f"{{text: {text.replace('{root}', str(corpus))}, window: 16, evaluation_windows: 1}}"
    pipeline = tiny_pipeline(corpus, "owntext", "\n  - prune: {mlp_ratio: 0.5}", data=data)
    with pytest.raises(ConfigError) as err:
        load_pipeline(pipeline)
    assert re.search(rf"owntext\.yaml(:\d+)?: data\.text\.path.*{re.escape(message)}", str(err.value)), str(err.value)
