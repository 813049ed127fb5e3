"""`sensitivity` / `accuracy_budget` on weight-only INT8 decoders (compress/stages/quantize/int8_lm_budget.py) on
the tiny Llama: a MatMul made fragile at 8 bits ranks first and is the one returned to float, the budget met;
an impossible budget yields the best candidate, met false and a failing gate; the artifact is the graph that
was judged; the refusals at validation."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from llm_toys import fragile_llama, own_text, tiny_pipeline

from compress.cli import EXIT_CONFIG, EXIT_GATE, main
from compress.families.causal_lm.sessions import OrtCausalLM
from compress.stages.quantize.mixed_budget import window_nll

OUTLIER = 1000.0  # o_proj columns scaled by it, the v rows feeding them divided by it: the float function unchanged
FRAGILE = "/model/model/layers.1/self_attn/o_proj/MatMul"  # the float node of layer 1's o_proj


def _data(tmp_path) -> str:
    """The model's own text: 2 evaluation windows, then 2 sensitivity + 4 judged calibration windows."""
    return (
        f'{{text: {{kind: text, path: "{tmp_path / "own.txt"}"}}, window: 64, evaluation_windows: 2, '
        'calibration_windows: 6, generation_tokens: 4, prompts: ["The for"]}'
    )


def _stage(name: str, budget: str, **over: str) -> str:
    keys = {"method": "weight-only", "group_size": 32, "sensitivity": "{windows: 2}", **over}
    opts = ", ".join(f"{k}: {v}" for k, v in keys.items())
    return f"\n  - quantize: {{precision: int8, {opts}, accuracy_budget: {{{budget}}}, input: onnx-fp32, name: {name}}}"


EXPORT = "\n  - export: {opset: 17, name: onnx-fp32}"


def _fragile_model(tmp_path) -> np.ndarray:
    """Layer 1's o_proj fragile at 8 bits (`fragile_llama(OUTLIER)`: 8-bit RTN rounds the rest of each group to
    zero, and int8 activations per block round the attention outputs feeding the outlier columns to zero), with
    its own text. Returns the sampled ids."""
    return own_text(fragile_llama(OUTLIER), tmp_path, windows=8, window=64)


def _float_matmuls(folder) -> set[str]:
    """The MatMuls of `folder`'s graph with a float weight (initializer) input."""
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return {n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights}


def _judged_ppl(folder, tmp_path) -> float:
    """Perplexity of `folder`'s graph on calibration windows 2-5 (the ones the candidates were judged on)."""
    from transformers import AutoTokenizer

    from compress.families.causal_lm.options import TextSource
    from compress.families.causal_lm.task import read_text, tokenize_windows

    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    ids = tokenize_windows(read_text(TextSource(kind="text", path=tmp_path / "own.txt")), tok, window=64)[4:8]
    session = OrtCausalLM(folder / "model.onnx", threads=1)
    windows = [ids[i : i + 1] for i in range(len(ids))]
    return float(np.exp(window_nll([session.logits(w) for w in windows], [{"input_ids": w} for w in windows]).mean()))


def test_fragile_matmul_returned_first_and_an_impossible_budget_gives_the_best_candidate(tmp_path):
    _fragile_model(tmp_path)
    stages = EXPORT + _stage("met", "max_rise: 5.0") + _stage("impossible", "max_rise: 0.0, sigmas: 4, max_fallback: 3")
    pipeline = tiny_pipeline(tmp_path, "budget", stages, data=_data(tmp_path))
    code = main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"])
    run = tmp_path / "runs" / "budget"
    manifest = json.loads((run / "manifest.json").read_text())
    arts = {r["artifact"]["name"]: r for r in manifest["artifacts"]}
    gates = {g["artifact"]: g for g in manifest["gates"] if g["gate"] == "accuracy_budget"}
    assert code == EXIT_GATE  # the impossible budget's gate

    info = arts["met"]["artifact"]["info"]
    sens, met = info["sensitivity"], info["accuracy_budget"]
    assert sens["windows"] == 2 and len(sens["nodes"]) == 15  # 2 layers x 7 Linears and the lm_head
    top, second = sens["nodes"][:2]
    assert top["node"] == FRAGILE and top["gain"] > 10 * max(second["gain"], 1e-9)
    assert top["kl_float"] < sens["kl_int8"] / 10  # floating it wins back most of the full INT8 graph's KL
    assert met["met"] and [n["node"] for n in met["float_nodes"]] == [top["node"]]
    first, fixed = met["steps"]  # full INT8, then the fragile MatMul float: the search stopped there
    assert first["added"] is None and fixed["added"] == top["node"]
    assert first["rise"] > 5.0 >= fixed["rise"] and first["rise"] > 3 * fixed["rise"]
    assert met["slice"] == [2, 6] and met["windows"] == 4 and met["blocked_by"] == []
    assert _float_matmuls(run / "met") == {FRAGILE}  # the artifact holds it as the float graph's MatMul
    # the graph judged ships (steps round ppl to 4 decimals); its floated unit's 8-bit tensors are gone
    assert _judged_ppl(run / "met", tmp_path) == pytest.approx(fixed["ppl"], abs=1e-4)
    graph = onnx.load(str(run / "met" / "model.onnx"), load_external_data=False).graph
    read = {x for node in graph.node for x in node.input}
    assert all(t.name in read for t in graph.initializer)
    rise = arts["met"]["evaluation"]["vs_parent"]["ppl_rise_pct"]  # the evaluation windows confirm it
    assert gates["met"]["value"] == pytest.approx(rise) and gates["met"]["status"] == ("pass" if rise <= 5 else "fail")
    assert rise < first["rise"]

    assert not sens["reused"] and arts["impossible"]["artifact"]["info"]["sensitivity"] == {**sens, "reused": True}
    best = arts["impossible"]["artifact"]["info"]["accuracy_budget"]
    order = [n["node"] for n in arts["impossible"]["artifact"]["info"]["sensitivity"]["nodes"]]
    steps = best["steps"]
    assert not best["met"] and len(steps) == 4  # full INT8 + max_fallback 3
    k = min(range(len(steps)), key=lambda i: (steps[i]["bound"], i))
    assert (
        [n["node"] for n in best["float_nodes"]] == order[:k] and best["rise"] == steps[k]["rise"] and best["bound"] > 0
    )
    assert [n["node"] for n in best["blocked_by"]] == order[k : k + 5]
    assert len(_float_matmuls(run / "impossible")) == k
    assert _judged_ppl(run / "impossible", tmp_path) == pytest.approx(steps[k]["ppl"], abs=1e-4)
    assert (
        gates["impossible"]["status"] == "fail"
        and "budget not met within max_fallback 3" in gates["impossible"]["detail"]
    )
    report = (run / "report.md").read_text()
    assert "**Not met** within 3 MatMul(s). Best candidate (this artifact)" in report
    assert f"| 1 | {top['node']} | {fixed['ppl']:.3f} | {fixed['rise']:.3f} |" in report
    assert (run / "sensitivity-met.png").stat().st_size > 1000


def test_sensitivity_alone_keeps_every_matmul_quantized(tmp_path):
    """`sensitivity` without a budget ranks the MatMuls and writes the full INT8 graph, the file the plain
    stage writes."""
    _fragile_model(tmp_path)
    plain = "\n  - quantize: {precision: int8, method: weight-only, group_size: 32, input: onnx-fp32, name: plain}"
    ranked = (
        "\n  - quantize: {precision: int8, method: weight-only, group_size: 32, sensitivity: {windows: 1}, "
        "input: onnx-fp32, name: ranked}"
    )
    pipeline = tiny_pipeline(tmp_path, "ranked", EXPORT + plain + ranked, data=_data(tmp_path))
    assert main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"]) == 0
    run = tmp_path / "runs" / "ranked"
    info = json.loads((run / "manifest.json").read_text())["artifacts"]
    sens = next(r for r in info if r["artifact"]["name"] == "ranked")["artifact"]["info"]["sensitivity"]
    assert sens["nodes"][0]["node"] == FRAGILE and "accuracy_budget" not in sens
    assert _float_matmuls(run / "ranked") == set()
    a, b = (onnx.load(str(run / n / "model.onnx")) for n in ("plain", "ranked"))
    assert a.graph.SerializeToString() == b.graph.SerializeToString()


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (_stage("b", "max_rise: 1.0, start: 1"), "start 1 overlaps the calibration windows [0, 2) the sensitivity"),
        (_stage("b", "max_drop: 1.0"), "a decoder's budget is a perplexity rise: write {max_rise: <%>, windows: N}"),
        (_stage("b", "max_rise: 1.0", sensitivity="{samples: 4}"), "a decoder's sensitivity counts calibration"),
        (_stage("b", "max_rise: 1.0, windows: 1, sigmas: 1"), "sigmas: one window has no standard error"),
        (
            _stage("b", "max_rise: 1.0", method="dynamic"),
            "applies to method static / weight-only only (method is dynamic)",
        ),
        (
            "\n  - quantize: {precision: int8, target: onnxruntime-genai, sensitivity: {windows: 1}, input: source}",
            "applies to our own ONNX graph (target onnxruntime-cpu), not to target onnxruntime-genai",
        ),
        (_stage("b", "max_rise: -1"), "greater than or equal to 0"),
    ],
    ids=["overlap", "max-drop", "samples", "sigmas", "dynamic", "genai", "negative"],
)
def test_budget_refused_at_validate(tmp_path, capsys, stage, message):
    (tmp_path / "own.txt").write_text("the for")
    pipeline = tiny_pipeline(tmp_path, "refused", EXPORT + stage, data=_data(tmp_path))
    assert main(["validate", str(pipeline)]) == EXIT_CONFIG
    assert message in capsys.readouterr().err


def test_a_family_without_decoders_refuses_the_decoder_search_and_the_key_holds_it():
    from compress.families.text_encoder.adapter import TextEncoderAdapter
    from compress.stages.quantize.int8 import Int8Options

    searched = Int8Options(precision="int8", method="weight-only", sensitivity={"windows": 1})
    assert searched.check_family(TextEncoderAdapter) == [
        ("sensitivity", "weight-only INT8 searches decoder LLMs only (by perplexity); family text-encoder has none")
    ]
    plain = Int8Options(precision="int8", method="weight-only")
    budget = Int8Options(precision="int8", method="weight-only", accuracy_budget={"max_rise": 0.5})
    keys = [o.cache_fields() for o in (plain, searched, budget)]
    assert "decoder_search_version" not in keys[0] and keys[1]["decoder_search_version"] == 2
    assert keys[0] != keys[1] != keys[2] and keys[2]["accuracy_budget"]["max_rise"] == 0.5


def test_a_slice_past_the_data_fails_the_stage_and_leaves_no_scratch(tmp_path, capsys):
    from compress.cli import EXIT_STAGE

    _fragile_model(tmp_path)
    pipeline = tiny_pipeline(
        tmp_path, "short", EXPORT + _stage("b", "max_rise: 1.0, windows: 10"), data=_data(tmp_path)
    )
    assert main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"]) == EXIT_STAGE
    err = capsys.readouterr().err
    assert "accuracy_budget needs calibration windows [2, 12), data.calibration_windows gives 6" in err
    assert not list((tmp_path / "runs").rglob("_probe")) and not (tmp_path / "runs" / "short" / "b").exists()
