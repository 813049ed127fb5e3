"""`model: {source: "hf:FOLDER", link: true}` on the tiny Llama: the source artifact names the folder's files
(sha256) instead of holding the model, a streamed quantize reads them and ships the same ONNX (byte for byte)
and perplexity as the same stage on a loaded source, the float baseline is not evaluated (so gates relative to
it are not checked: INCOMPLETE), a shard changed after it was recorded is refused by name, and stages that need
the float model are refused at validate."""

from __future__ import annotations

import json

import pytest
from llm_toys import tiny_pipeline

from compress.cli import EXIT_CONFIG, EXIT_INCOMPLETE, EXIT_OK, EXIT_STAGE, main
from compress.families.causal_lm.linked import LINK_FILE, NOT_MATERIALISED
from compress.hashing import sha256_file

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'compress[llm]')")

DATA = '{window: 64, evaluation_windows: 2, calibration_windows: 2, generation_tokens: 4, prompts: ["def"]}'
STREAMED = (
    "\n  - quantize: {precision: int4, method: rtn, group_size: 32, lm_head: int4, target: onnxruntime-genai, "
    "streamed: true, name: int4}"
)


def _run(tmp_path, name: str, link: bool) -> tuple[int, dict]:
    pipeline = tiny_pipeline(tmp_path, name, STREAMED, data=DATA, gates="{ppl_rise_max: 50}", sharpen=4.0, link=link)
    code = main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"])
    manifest = json.loads((tmp_path / "runs" / name / "manifest.json").read_text())
    return code, manifest


def test_linked_pipeline_ships_the_loaded_pipelines_file(tmp_path) -> None:
    code, linked = _run(tmp_path, "linked", link=True)
    assert code == EXIT_INCOMPLETE and linked["verdict"] == "INCOMPLETE"
    rec = {r["artifact"]["name"]: r for r in linked["artifacts"]}
    source = rec["source"]["artifact"]
    assert source["file"] == LINK_FILE and source["unmeasured"] == NOT_MATERIALISED
    assert rec["source"]["evaluation"] is None  # the float model is never materialised
    record = json.loads((tmp_path / "runs" / "linked" / "source" / LINK_FILE).read_text())
    model_dir = tmp_path / "model"
    assert record["files"]["model.safetensors"]["sha256"] == sha256_file(model_dir / "model.safetensors")
    assert rec["source"]["size_bytes"] >= (model_dir / "model.safetensors").stat().st_size  # the weights count
    assert not list((tmp_path / "runs" / "linked" / "source").glob("*.safetensors"))  # no copy of the weights
    (gate,) = linked["gates"]
    assert gate["status"] == "not-checked" and NOT_MATERIALISED in gate["detail"], gate

    code, loaded = _run(tmp_path, "loaded", link=False)
    assert code == EXIT_OK
    other = {r["artifact"]["name"]: r for r in loaded["artifacts"]}
    ppl = rec["int4"]["evaluation"]["metrics"]["ppl"]
    assert ppl == other["int4"]["evaluation"]["metrics"]["ppl"]  # the same graph from the same codes: exact
    a, b = (tmp_path / "runs" / n / "int4" for n in ("linked", "loaded"))
    assert sha256_file(a / "model.onnx.data") == sha256_file(b / "model.onnx.data")
    assert sha256_file(a / "model.onnx") == sha256_file(b / "model.onnx")


@pytest.mark.parametrize("damage", ["change", "delete"])
def test_linked_shard_changed_after_recording_is_refused(tmp_path, capsys, monkeypatch, damage) -> None:
    from compress.runner import Runner

    original = Runner._source
    shard = tmp_path / "model" / "model.safetensors"

    def source_then_damage(self) -> None:
        original(self)
        if damage == "delete":
            shard.unlink()
        else:
            with shard.open("r+b") as fh:  # same size, other bytes
                fh.seek(-8, 2)
                fh.write(b"\x00" * 8)

    monkeypatch.setattr(Runner, "_source", source_then_damage)
    pipeline = tiny_pipeline(tmp_path, "damaged", STREAMED, data=DATA, link=True)
    assert main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"]) == EXIT_STAGE
    err = capsys.readouterr()
    said = err.out + err.err
    assert f"{shard} {'is missing' if damage == 'delete' else 'has changed'}" in said, said


@pytest.mark.parametrize(
    "stage,says",
    [
        ("prune: {mlp_ratio: 0.25}", "stages[0].prune"),
        ("export: {}", "stages[0].export"),
        ("quantize: {precision: int4, method: gptq}", "stages[0].quantize"),
        ("quantize: {precision: int4, method: rtn, target: onnxruntime-genai}", "stages[0].quantize"),
    ],
)
def test_linked_source_refuses_stages_that_need_the_float_model(tmp_path, capsys, stage, says) -> None:
    pipeline = tiny_pipeline(tmp_path, "bad", f"\n  - {stage}", data=DATA, link=True)
    assert main(["validate", str(pipeline)]) == EXIT_CONFIG
    err = capsys.readouterr()
    said = err.out + err.err
    assert says in said and "model.link: true never materialises" in said and "streamed: true" in said, said


def test_linked_source_must_be_a_local_folder(tmp_path, capsys) -> None:
    pipeline = tiny_pipeline(tmp_path, "hub", STREAMED, data=DATA, link=True)
    pipeline.write_text(pipeline.read_text().replace(f"hf:{tmp_path / 'model'}", "hf:meta-llama/Llama-3.1-8B"))
    assert main(["validate", str(pipeline)]) == EXIT_CONFIG
    err = capsys.readouterr()
    said = err.out + err.err
    assert "model.link" in said and "not a local folder" in said, said
