"""The causal-lm adapter through the runner: a tiny random Llama exported with KV cache, INT8, gates."""

from __future__ import annotations

import json

import pytest
from llm_toys import tiny_llama, tiny_tokenizer

from compress.cli import EXIT_CONFIG, EXIT_OK, main


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llm")
    model_dir = tmp / "model"
    tiny_llama(tie=True).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    pipeline = tmp / "tiny.yaml"
    pipeline.write_text(f"""name: tinyllm
model: {{family: causal-lm, source: "hf:{model_dir}"}}
data: {{window: 64, evaluation_windows: 4, calibration_windows: 4, generation_tokens: 8,
       prompts: ["The for statement", "def"], presets: [balanced, beam], preset_seed: 0}}
stages:
  - export: {{opset: 17, name: onnx-fp32}}
  - quantize: {{precision: int8, name: int8}}
  - quantize: {{precision: int8, method: dynamic, name: int8-dyn, input: onnx-fp32}}
gates:
  ppl_rise_max: 5.0
  decode_speedup_min: {{artifact: int8, vs: onnx-fp32, at_least: 0.01}}
bench: {{batch_sizes: [1, 2], prompt_lengths: [16], decode_tokens: 4, warmup: 1, iterations: 3}}
""")
    runs = tmp / "runs"
    code = main(["run", str(pipeline), "--runs-dir", str(runs), "--quiet"])
    return code, runs / "tinyllm", pipeline


def test_pipeline_runs_and_reports(llm_run) -> None:
    code, run_dir, _ = llm_run
    assert code == EXIT_OK
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rec = {r["artifact"]["name"]: r for r in manifest["artifacts"]}
    src, fp32 = rec["source"]["evaluation"], rec["onnx-fp32"]["evaluation"]
    # a random 1000-word model is close to uniform: perplexity near the vocabulary size
    assert 800 < src["metrics"]["ppl"] < 1200
    # the ONNX decoder computes the same function: same perplexity (1e-4 relative), same argmax, same greedy text
    assert fp32["vs_baseline"]["ppl_rise_pct"] == pytest.approx(0.0, abs=1e-2)
    assert fp32["vs_baseline"]["agreement"] == 100.0
    assert fp32["vs_baseline"]["greedy_identical"] == 100.0
    assert rec["int8"]["artifact"]["info"]["method"] == "weight-only"  # `auto` asks the causal-lm adapter
    assert rec["int8-dyn"]["artifact"]["info"]["method"] == "dynamic"
    assert rec["int8"]["evaluation"]["vs_baseline"]["agreement"] > 80.0
    llm = rec["int8"]["bench"]["llm"]
    assert set(map(int, llm["decode_tokens_per_s"])) == {1, 2} and llm["decode_bound_ms"] > 0
    gates = {g["gate"]: g for g in manifest["gates"]}
    assert gates["decode_speedup_min"]["value"] is not None
    report = (run_dir / "report.md").read_text()
    assert "decode tok/s b1" in report and "perplexity rise %" in report


def test_generate_command_reads_tokenizer_from_parents(llm_run, capsys) -> None:
    _, run_dir, _ = llm_run
    assert (
        main(["generate", str(run_dir / "int8"), "The for statement", "--max-new-tokens", "4", "--threads", "1"]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("The for statement") and "[int8: onnx int8" in out


def _preset_runs(run_dir, name: str) -> dict:
    from compress.artifact import EVAL_FILE

    return json.loads((run_dir / name / EVAL_FILE).read_text())["outputs"]["presets"]["runs"]


def test_preset_continuations_recorded_and_reported(llm_run) -> None:
    _, run_dir, _ = llm_run
    runs = {n: _preset_runs(run_dir, n) for n in ("source", "onnx-fp32", "int8")}
    for by_preset in runs.values():
        assert set(by_preset) == {"balanced", "beam"}
        for run in by_preset.values():
            assert len(run["tokens"]) == 2 and all(0 < len(r) <= 8 for r in run["tokens"])
    assert runs["source"]["balanced"]["settings"] == {
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
        "seed": 0,
    }
    # beam search is deterministic and the ONNX export computes torch's function: the same beams
    assert runs["onnx-fp32"]["beam"]["tokens"] == runs["source"]["beam"]["tokens"]
    report, html = (run_dir / "report.md").read_text(), (run_dir / "report.html").read_text()
    assert "## Decoding presets on the fixed prompts" in report
    assert "- `balanced`: do_sample True, temperature 0.7, top_p 0.9, repetition_penalty 1.1, seed 0" in report
    assert "| artifact | greedy | balanced | beam |" in report and "**The for statement**" in report
    assert "<h2>Decoding presets on the fixed prompts</h2>" in html


def test_unknown_pipeline_preset_is_a_config_error(llm_run, tmp_path, capsys) -> None:
    _, _, pipeline = llm_run
    bad = tmp_path / "bad.yaml"
    bad.write_text(pipeline.read_text().replace("presets: [balanced, beam]", "presets: [balanced, wild]"))
    assert main(["validate", str(bad)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "data.presets = 'wild': unknown preset; allowed: greedy, precise, balanced, creative, beam" in err


def test_generate_presets_on_torch_and_onnx_artifacts(llm_run, capsys) -> None:
    _, run_dir, _ = llm_run

    def text(name: str, *flags: str) -> list[str]:
        args = ["generate", str(run_dir / name), "def", "--max-new-tokens", "6", "--threads", "1", *flags]
        assert main(args) == 0
        return capsys.readouterr().out.splitlines()

    torch_beam, onnx_beam = text("source", "--preset", "beam"), text("onnx-fp32", "--preset", "beam")
    assert torch_beam[0] == onnx_beam[0] and "torch, preset beam" in torch_beam[-1]
    sampled = text("int8", "--preset", "balanced", "--temperature", "1.5", "--seed", "0")
    again = text("int8", "--preset", "balanced", "--temperature", "1.5", "--seed", "0")
    assert sampled[:-1] == again[:-1]  # the text; the last line holds the measured tokens/s
    assert "onnxruntime, preset balanced" in sampled[-1]


def test_weight_only_int8_cannot_target_tensorrt(llm_run, tmp_path) -> None:
    _, _, pipeline = llm_run
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        pipeline.read_text().replace("{precision: int8, name: int8}", "{precision: int8, name: int8, target: tensorrt}")
    )
    assert main(["run", str(bad), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"]) == EXIT_CONFIG
