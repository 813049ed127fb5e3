"""`quantize: {precision: int4, target: onnxruntime-genai}` through the runner on the tiny Llama.

The same GPTQ g32 weights go to our own INT4 export (onnxruntime-cpu) and to onnxruntime-genai's fused
graph; both are evaluated and benchmarked by the same decoder session, so their figures compare directly.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
from llm_toys import tiny_pipeline

from compress.cli import EXIT_CONFIG, EXIT_OK, main

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'compress[llm]')")

DATA = '{window: 64, evaluation_windows: 4, calibration_windows: 4, generation_tokens: 8, prompts: ["The for", "def"]}'
GPTQ = "method: {name: gptq, samples: 4}, group_size: 32"
STAGES = f"""
  - quantize: {{precision: int4, {GPTQ}, name: int4-ours}}
  - quantize: {{precision: int4, {GPTQ}, target: onnxruntime-genai, name: int4-genai, input: source}}
  - quantize: {{precision: int4, {GPTQ}, lm_head: int4, name: int4-genai-cuda, input: source,
                target: {{name: onnxruntime-genai, execution_provider: cuda}}}}"""
GATES = "{ppl_rise_max: 50.0, metric_gates_on: [int4-ours, int4-genai]}"
BENCH = "\nbench: {batch_sizes: [1], prompt_lengths: [16], decode_tokens: 4, warmup: 1, iterations: 2}\n"
#: perplexity of the fused graph vs our export of the same codes: they differ only by the scales' fp16
#: rounding and the kernels' summation order (both MatMulNBits at accuracy level 4), far below 0.5 %
PPL_RTOL = 5e-3


@pytest.fixture(scope="module")
def genai_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("genai-run")
    pipeline = tiny_pipeline(tmp, "tinygenai", STAGES, data=DATA, gates=GATES, sharpen=4.0)
    pipeline.write_text(pipeline.read_text() + BENCH)
    code = main(["run", str(pipeline), "--runs-dir", str(tmp / "runs"), "--quiet"])
    manifest = json.loads((tmp / "runs" / "tinygenai" / "manifest.json").read_text())
    return code, tmp / "runs" / "tinygenai", {r["artifact"]["name"]: r for r in manifest["artifacts"]}, pipeline


def _greedy(run_dir, name: str) -> list[list[int]]:
    return json.loads((run_dir / name / "_evaluation.json").read_text())["outputs"]["greedy"]


def test_genai_target_runs_and_ships_the_fused_graph(genai_run) -> None:
    code, run_dir, rec, _ = genai_run
    assert code == EXIT_OK
    art = rec["int4-genai"]["artifact"]
    assert art["file"] == "model.onnx" and art["target"] == "onnxruntime-genai"
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= set(art["files"])
    assert not any(f.startswith("_hf") or f.startswith("_genai") for f in art["files"])  # temporaries removed
    ops = collections.Counter(n.op_type for n in onnx.load(str(run_dir / "int4-genai" / "model.onnx")).graph.node)
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] >= 2
    assert ops["MatMulNBits"] == 2 * 5  # packed QKV, o, gate, up, down per layer; lm_head float
    assert art["info"]["fused_ops"]["GroupQueryAttention"] == 2
    assert art["info"]["builder"].startswith("onnxruntime-genai ")


def test_genai_artifact_is_measured_like_our_export(genai_run) -> None:
    _, run_dir, rec, _ = genai_run
    ours, genai = rec["int4-ours"], rec["int4-genai"]
    ppl_ours, ppl_genai = ours["evaluation"]["metrics"]["ppl"], genai["evaluation"]["metrics"]["ppl"]
    assert ppl_genai == pytest.approx(ppl_ours, rel=PPL_RTOL), (ppl_genai, ppl_ours)
    # same next-token argmax at every evaluated position (both files' predictions, as the runner saved them)
    top1 = [np.load(run_dir / n / "_predictions.npy") for n in ("int4-genai", "int4-ours")]
    assert top1[0].shape == top1[1].shape and (top1[0] == top1[1]).mean() == 1.0
    for a, b in zip(_greedy(run_dir, "int4-genai"), _greedy(run_dir, "int4-ours"), strict=True):
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        assert first is None, f"greedy continuations diverge at token {first}: {a} vs {b}"
    assert genai["artifact"]["info"]["parity_greedy_tokens_match"] is True
    assert genai["bench"]["llm"]["decode_tokens_per_s"]["1"] > 0  # the fused graph itself was timed


def test_genai_artifact_is_benchmarked_through_its_generator(genai_run) -> None:
    """The deployable engine times the deployable file; our own export keeps our session."""
    _, run_dir, rec, _ = genai_run
    assert rec["int4-genai"]["bench"]["llm"]["engine"] == "onnxruntime-genai"
    assert rec["int4-ours"]["bench"]["llm"]["engine"] == "onnxruntime"
    report = (run_dir / "report.md").read_text()
    speed = [line for line in report.splitlines() if "| decode tok/s b1 |" in line or "| onnxruntime | onnx" in line]
    assert "| artifact | backend | engine |" in speed[0]
    assert any(line.startswith("| int4-genai | onnxruntime | onnxruntime-genai |") for line in speed[1:])
    assert any(line.startswith("| int4-ours | onnxruntime | onnxruntime |") for line in speed[1:])


def test_generator_bench_decodes_exactly_the_tokens_asked(genai_run) -> None:
    from compress.bench.decoder import bench_decoder
    from compress.families.causal_lm.genai_engine import GeneratorBench

    _, run_dir, _, _ = genai_run
    engine = GeneratorBench(run_dir / "int4-genai", threads=1)
    ids = np.random.default_rng(0).integers(3, 900, size=(2, 9))
    steps = engine.timed_decode(ids, 5)  # raises unless every row holds prompt + 1 + 5 tokens
    assert len(steps) == 5 and min(steps) > 0 and engine.vocab_size == 1000
    logits, _ = engine.prefill(ids)
    assert logits.shape[:2] == (2, 1)
    res = bench_decoder(
        engine, vocab_size=900, weight_bytes=1, size_bytes=1, threads=1, prompt_lengths=(8,), batch_sizes=(1, 2),
        decode_context=6, decode_tokens=4, warmup=0, iterations=2, bandwidth_gbs=1.0,
    )  # fmt: skip
    assert res.engine == "onnxruntime-genai" and set(res.decode_tokens_per_s) == {1, 2}
    assert res.decode_tokens_per_s[2] == pytest.approx(2e3 / res.decode_step_ms[2])


def test_cuda_flavour_is_built_not_measured(genai_run) -> None:
    _, run_dir, rec, _ = genai_run
    cuda = rec["int4-genai-cuda"]
    assert cuda["artifact"]["unmeasured"].startswith("needs an NVIDIA GPU")
    assert cuda["evaluation"] is None and "bench" not in cuda
    assert not (run_dir / "int4-genai-cuda" / "_evaluation.json").exists()
    graph = onnx.load(str(run_dir / "int4-genai-cuda" / "model.onnx"), load_external_data=False)
    logits = next(o for o in graph.graph.output if o.name == "logits")
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16  # the GPU flavour's I/O
    ops = collections.Counter(n.op_type for n in graph.graph.node)
    assert ops["GatherBlockQuantized"] == 1  # lm_head int4 (ours): the tied embedding reads its codes
    assert cuda["artifact"]["info"]["parity"].startswith("not run: needs an NVIDIA GPU")


def test_generate_refuses_the_gpu_flavour(genai_run, capsys) -> None:
    """ONNX Runtime's CPU would run the CUDA graph; a CPU tokens/s printed for a GPU file would mislead."""
    _, run_dir, _, _ = genai_run
    assert main(["generate", str(run_dir / "int4-genai-cuda"), "hello", "--max-new-tokens", "2"]) == EXIT_CONFIG
    assert "needs an NVIDIA GPU" in capsys.readouterr().err


def test_generate_runs_the_genai_artifact_through_its_generator(genai_run, capsys) -> None:
    """The deployable engine: onnxruntime-genai's Generator, its greedy text that of our engine on the graph."""
    _, run_dir, _, _ = genai_run

    def lines(name: str, *flags: str) -> list[str]:
        assert main(["generate", str(run_dir / name), "def", "--max-new-tokens", "6", "--threads", "1", *flags]) == 0
        return capsys.readouterr().out.splitlines()

    genai = lines("int4-genai")
    assert "onnxruntime-genai Generator, preset greedy" in genai[-1]
    sampled = lines("int4-genai", "--preset", "creative", "--seed", "0")
    again = lines("int4-genai", "--preset", "creative", "--seed", "0")
    assert sampled[:-1] == again[:-1]  # the text; the last line holds the measured tokens/s
    from compress.families.causal_lm.genai_engine import genai_generate, open_genai_model
    from compress.families.causal_lm.generate import GenerationOptions, generate
    from compress.families.causal_lm.sessions import OrtCausalLM

    folder = run_dir / "int4-genai"
    opts = GenerationOptions(max_new_tokens=8, stop_token_ids=(2,))
    ours = generate(OrtCausalLM(folder / "model.onnx", threads=1), [[5, 6, 7]], opts).tokens
    assert genai_generate(open_genai_model(folder, threads=1, stop_token_ids=(2,)), [[5, 6, 7]], opts).tokens == ours


@pytest.mark.parametrize(
    ("options", "key"),
    [
        (f"{GPTQ}, keep: ['model.layers.0.*']", "keep"),
        ("method: rtn, target: {name: onnxruntime-genai, dynamo: true}", "target"),
        ("method: rtn, target: {name: onnxruntime-genai, opset: 21}", "target"),
    ],
)
def test_refused_combination_exits_2_naming_the_key(tmp_path, capsys, options: str, key: str) -> None:
    target = "" if "target:" in options else ", target: onnxruntime-genai"
    stages = f"\n  - quantize: {{precision: int4, {options}{target}}}"
    pipeline = tiny_pipeline(tmp_path, "refused", stages, data=DATA)
    assert main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"quantize.{key}" in err and "onnxruntime-genai" in err, err


def test_int8_genai_target_builds_from_torch_not_onnx(tmp_path, capsys) -> None:
    # int8 for onnxruntime-genai starts from the torch model (its builder writes the graph): tests/genai
    stages = "\n  - export: {opset: 17}\n  - quantize: {precision: int8, target: onnxruntime-genai}"
    pipeline = tiny_pipeline(tmp_path, "int8genai", stages, data=DATA)
    assert main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"]) == EXIT_CONFIG
    assert "it starts from torch" in capsys.readouterr().err


def test_only_decoder_families_take_the_genai_target() -> None:
    from compress.families.causal_lm.adapter import CausalLMAdapter
    from compress.families.vision.adapter import VisionAdapter
    from compress.stages.quantize.int4 import Int4Options

    options = Int4Options(precision="int4", method="rtn", target="onnxruntime-genai")
    assert options.check_family(CausalLMAdapter) == []
    [(key, message)] = options.check_family(VisionAdapter)
    assert key == "target" and "family 'vision'" in message


def test_architectures_the_builder_cannot_read_are_refused_before_quantizing() -> None:
    from types import SimpleNamespace

    from compress.errors import StageError
    from compress.stages.quantize.genai_target import refuse_architecture

    refuse_architecture(SimpleNamespace(config=SimpleNamespace(architectures=["LlamaForCausalLM"])))
    with pytest.raises(StageError, match="this model is GPT2LMHeadModel: use target: onnxruntime-cpu"):
        refuse_architecture(SimpleNamespace(config=SimpleNamespace(architectures=["GPT2LMHeadModel"])))
