"""scripts/streamed_int4.py across a kill: each hold appends its finished layers (and the head step) to
WORK/progress.jsonl, and the summary of the run that finishes covers every hold (layers done by the killed one
with their measured seconds, the peak over all holds)."""

from __future__ import annotations

import functools
import json

import pytest
from llm_toys import tiny_llama
from toys import load_script

from compress.quant import streamed


@pytest.fixture(scope="module")
def script():
    return load_script("streamed_int4")


def test_summary_covers_every_hold(script, tmp_path, monkeypatch, capsys) -> None:
    folder = tmp_path / "hf"
    tiny_llama(tie=True, layers=3).save_pretrained(folder)
    work, real = tmp_path / "work", streamed.stream_quantize
    args = [str(folder), str(work), "--group-size", "32", "--threads", "1", "--no-build", "--keep"]

    def killed_at_layer_2(ckpt, linears, prefix, cfg):
        if prefix.endswith(".2."):
            raise KeyboardInterrupt  # what a kill looks like from inside the loop
        return streamed._quantize_layer(ckpt, linears, prefix, cfg)

    monkeypatch.setattr(script, "stream_quantize", functools.partial(real, quantize_layer=killed_at_layer_2))
    with pytest.raises(KeyboardInterrupt):
        script.main(args)
    first = script.read_progress(work / script.PROGRESS_FILE)
    assert [(line["layer"], line["reused"]) for line in first] == [(0, False), (1, False)]

    monkeypatch.setattr(script, "stream_quantize", real)
    capsys.readouterr()
    script.main(args)
    lines = script.read_progress(work / script.PROGRESS_FILE)
    second = lines[len(first) :]
    assert [(line["layer"], line["reused"]) for line in second] == [(0, True), (1, True), (2, False), ("head", False)]
    assert len({line["hold"] for line in first} | {line["hold"] for line in second}) == 2
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]
    total = summary["quantize_all_holds"]
    assert total["holds"] == 2 and total["layers_quantized_by_hold"] == [2, 1]
    seconds = [first[0]["seconds"], first[1]["seconds"], second[2]["seconds"]]  # each from the hold that did it
    assert total["layer_seconds"]["n"] == 3 and total["layer_seconds"]["sum"] == round(sum(seconds), 1)
    assert total["head_seconds"] == second[3]["seconds"]
    assert total["peak_rss_mb_all_holds"] == max(line["peak_rss_mb"] for line in lines) > 0
