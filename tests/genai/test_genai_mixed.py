"""Mixed 4/8-bit INT4 under a size budget on the tiny Llama: units, exact sizes, the builder's 8-bit nodes,
the greedy choice (a deliberately fragile unit first), the refusals and the reuse of the sensitivity table."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from llm_toys import tiny_llama, tiny_pipeline, tiny_tokenizer
from test_genai_build import EVERY_LINEAR, _graph, _nbits_weights, _ours_fp16_scales

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'compress[llm]')")

from compress.cli import EXIT_CONFIG, EXIT_OK, EXIT_STAGE, main  # noqa: E402
from compress.genai.build import build_fused_decoder  # noqa: E402
from compress.quant.algorithms.rtn import rtn_quantize, rtn_quantize_model  # noqa: E402
from compress.quant.mixed import (  # noqa: E402
    choose_units,
    fixed_bytes,
    fused_units,
    kl_divergence,
    matmul_nbits_bytes,
    unit_bytes,
)
from compress.quant.primitives.weight import WeightQuantConfig  # noqa: E402

FRAGILE = "model.layers.1.self_attn.o_proj"
FRAGILE_NODE = "/model/layers.1/attn/o_proj/MatMulNBits"
DATA = '{window: 64, evaluation_windows: 2, calibration_windows: 4, generation_tokens: 4, prompts: ["The for"]}'


def _shapes(model) -> dict[str, tuple[int, int]]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _mixed_weights(model, eight: set[str], g8: int) -> dict:
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    qws = rtn_quantize_model(model, config=WeightQuantConfig(group_size=32), layers_filter=EVERY_LINEAR)
    for name in eight:
        qws[name] = rtn_quantize(floats[name], WeightQuantConfig(bits=8, group_size=g8))
    return qws


def test_units_pack_qkv_keep_gate_up_apart():
    units = fused_units(_shapes(tiny_llama(tie=True)))
    nodes = {u.node: u for u in units}
    assert len(units) == 11  # 2 layers x (qkv, o, gate, up, down) + lm_head
    qkv = nodes["/model/layers.1/attn/qkv_proj/MatMulNBits"]
    assert qkv.modules == tuple(f"model.layers.1.self_attn.{x}_proj" for x in "qkv")
    assert (qkv.out_features, qkv.in_features) == (64 + 2 * 32, 64)
    assert nodes["/model/layers.0/mlp/down_proj/MatMulNBits"].in_features == 128
    assert (nodes["/lm_head/MatMulNBits"].out_features, nodes["/lm_head/MatMulNBits"].in_features) == (1000, 64)
    # codes + fp32 scales + packed zero points: 4-bit g32 over K=64 is 2 blocks of 16 bytes, 8 bytes, 1 byte
    assert matmul_nbits_bytes(128, 64, 4, 32) == 128 * (32 + 8 + 1)
    assert matmul_nbits_bytes(1000, 64, 8, 64) == 1000 * (64 + 4 + 1)


def test_builder_writes_8_bit_nodes_exactly_where_chosen_and_the_predicted_bytes(tmp_path):
    model = tiny_llama(tie=True)
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    shapes = _shapes(model)
    eight = {"model.layers.0.mlp.down_proj", "lm_head", *(f"model.layers.1.self_attn.{x}_proj" for x in "qkv")}
    qws = _mixed_weights(model, eight, g8=64)
    out = build_fused_decoder(
        tmp_path / "hf", tmp_path / "mixed", precision="int4", quantized=qws, mixed=True, lm_head="int8"
    )
    graph = _graph(out, data=False)
    attrs = {
        n.name: {a.name: a.i for a in n.attribute if a.name in ("bits", "block_size")}
        for n in graph.graph.node
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
    }
    chosen = {u.node for u in fused_units(shapes) if set(u.modules) <= eight}
    assert chosen == {
        "/model/layers.0/mlp/down_proj/MatMulNBits",
        "/model/layers.1/attn/qkv_proj/MatMulNBits",
        "/lm_head/MatMulNBits",
    }
    for node, a in attrs.items():
        want = (
            {"bits": 8, "block_size": 64} if node in chosen or "embed_tokens" in node else {"bits": 4, "block_size": 32}
        )
        assert a == want, node  # the tied embedding reads the 8-bit head's codes
    got = _nbits_weights(_graph(out))
    assert torch.equal(
        got["/model/layers.0/mlp/down_proj/MatMulNBits"], _ours_fp16_scales(qws["model.layers.0.mlp.down_proj"])
    )
    predicted = fixed_bytes(model.config) + sum(
        unit_bytes(u, 8, 64) if u.node in chosen else unit_bytes(u, 4, 32) for u in fused_units(shapes)
    )
    assert (out / "model.onnx.data").stat().st_size == predicted


def test_builder_refuses_split_qkv_bits_and_8_bits_without_mixed(tmp_path):
    model = tiny_llama(tie=True)
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    qws = _mixed_weights(model, {"model.layers.0.self_attn.q_proj"}, g8=32)
    with pytest.raises(ValueError, match=r"packs self_attn.q_proj, self_attn.k_proj, self_attn.v_proj"):
        build_fused_decoder(tmp_path / "hf", tmp_path / "a", precision="int4", quantized=qws, mixed=True)
    with pytest.raises(ValueError, match=r"not 4-bit"):
        build_fused_decoder(tmp_path / "hf", tmp_path / "b", precision="int4", quantized=qws)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_kl_and_greedy_choice_by_gain_per_mb():
    ref = torch.tensor([[0.0, 1.0, 2.0]])
    assert kl_divergence(ref, ref) == 0.0
    p, q = torch.softmax(ref, -1), torch.softmax(torch.tensor([[2.0, 1.0, 0.0]]), -1)
    assert math.isclose(
        kl_divergence(ref, torch.tensor([[2.0, 1.0, 0.0]])), float((p * (p / q).log()).sum()), rel_tol=1e-6
    )
    table = {
        "kl_4bit": 1.0,
        "units": [
            {"node": "big", "gain": 0.5, "kl_8bit": 0.5},  # 0.5 per MB, does not fit after "dense"
            {"node": "dense", "gain": 0.3, "kl_8bit": 0.7},  # 0.6 per MB
            {"node": "small", "gain": 0.1, "kl_8bit": 0.9},  # 0.2 per MB, fits after "big" is passed over
            {"node": "harmful", "gain": -0.1, "kl_8bit": 1.1},
        ],
    }
    costs = {"big": 1_000_000, "dense": 500_000, "small": 500_000, "harmful": 1}
    choice = choose_units(table, costs, base_bytes=10_000_000, max_bytes=11_200_000)
    assert choice.eight == ("dense", "small") and choice.predicted_bytes == 11_000_000
    assert [r["node"] for r in choice.rows] == ["dense", "big", "small", "harmful"]
    assert [r["chosen"] for r in choice.rows] == [True, False, True, False]


def test_awq_on_float_hears_the_float_equivalent_weights():
    from compress.quant.algorithms.awq import AWQConfig, awq_quantize_model

    model, reference = tiny_llama(tie=True), tiny_llama(tie=True)
    ids = torch.from_numpy(np.random.default_rng(1).integers(3, 1000, size=(1, 24)))
    heard = {}
    awq_quantize_model(
        model, [ids], config=AWQConfig(group_size=32, n_grid=4), on_float=lambda n, w: heard.__setitem__(n, w.clone())
    )
    assert len(heard) == 14  # every decoder Linear (the tied head is the stage's)
    with torch.no_grad():
        modules = dict(model.named_modules())
        scaled = [n for n in heard if not torch.equal(heard[n], dict(reference.named_modules())[n].weight)]
        assert scaled  # AWQ scaled some of them: they are not the original weights
        for name, w in heard.items():
            modules[name].weight.copy_(w)  # the folded norms stay: this must be the float model again
        np.testing.assert_allclose(model(ids).logits.numpy(), reference(ids).logits.numpy(), atol=1e-4, rtol=0)


def _fragile_model_dir(tmp_path):
    """The tiny Llama with one outlier column per group of 32 in FRAGILE (its 4-bit RTN loses the rest), the
    final norm sharpened so that the near-uniform random model has next-token opinions to lose."""
    model = tiny_llama(tie=True)
    with torch.no_grad():
        dict(model.named_modules())[FRAGILE].weight[:, ::32] *= 10.0
        model.model.norm.weight.mul_(8.0)
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    return model


def _stage(
    name: str,
    max_mb: float,
    g8: int = 32,
    *,
    method: str = "rtn",
    head: str = "int4",
    target: str = "onnxruntime-genai",
) -> str:
    return (
        f"\n  - quantize: {{precision: int4, method: {method}, group_size: 32, lm_head: {head}, target: {target}, "
        f"mixed: {{max_mb: {max_mb}, windows: 2, group_size: {g8}}}, input: source, name: {name}}}"
    )


def _sizes(model, g8: int = 32) -> tuple[int, dict[str, int]]:
    units = fused_units(_shapes(model))
    low = fixed_bytes(model.config) + sum(unit_bytes(u, 4, 32) for u in units)
    return low, {u.node: unit_bytes(u, 8, g8) - unit_bytes(u, 4, 32) for u in units}


def test_fragile_unit_chosen_first_size_exact_and_table_reused(tmp_path):
    model = _fragile_model_dir(tmp_path)
    low, extra = _sizes(model)
    one = (low + extra[FRAGILE_NODE]) / 1e6  # room for the fragile unit and nothing more
    stages = _stage("one", one) + _stage("more", (low + 4 * extra[FRAGILE_NODE]) / 1e6) + _stage("g64", one, g8=64)
    pipeline = tiny_pipeline(tmp_path, "mixed", stages, data=DATA)
    code = main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"])
    assert code == EXIT_OK
    run = tmp_path / "runs" / "mixed"
    arts = {r["artifact"]["name"]: r["artifact"] for r in json.loads((run / "manifest.json").read_text())["artifacts"]}
    one_mix, more_mix, g64 = (arts[n]["info"]["mixed"] for n in ("one", "more", "g64"))
    assert one_mix["units"][0]["node"] == FRAGILE_NODE and one_mix["eight_bit"] == [FRAGILE_NODE]
    assert one_mix["units"][0]["gain_per_mb"] > 3 * one_mix["units"][1]["gain_per_mb"]  # measured 4.1x
    assert one_mix["predicted_bytes"] == one_mix["real_bytes"] == low + extra[FRAGILE_NODE]
    assert (run / "one" / "model.onnx.data").stat().st_size == one_mix["real_bytes"]
    bits = {
        n.name: next(a.i for a in n.attribute if a.name == "bits")
        for n in onnx.load(str(run / "one" / "model.onnx"), load_external_data=False).graph.node
        if n.op_type == "MatMulNBits"
    }
    assert {n for n, b in bits.items() if b == 8} == {FRAGILE_NODE} and len(bits) == 11
    # the second budget reuses the first's 4-bit weights and table; another 8-bit group size measures its own table
    assert [arts[n]["info"]["mixed"]["quantized_reused"] for n in ("one", "more", "g64")] == [False, True, True]
    assert (one_mix["sensitivity_reused"], more_mix["sensitivity_reused"], g64["sensitivity_reused"]) == (
        False,
        True,
        False,
    )
    assert [u["gain"] for u in more_mix["units"]] == [u["gain"] for u in one_mix["units"]]
    assert more_mix["eight_bit"][0] == FRAGILE_NODE and len(more_mix["eight_bit"]) > 1
    assert more_mix["real_bytes"] <= (low + 4 * extra[FRAGILE_NODE])
    report = (run / "report.md").read_text()
    assert f"| 1 | {FRAGILE_NODE} |" in report and report.count("## Mixed 4/8 bits under a size budget") == 3
    ppl = {n: arts[n]["info"].get("parity_max_abs_diff") for n in arts}
    assert ppl["one"] is not None and ppl["one"] < 0.5  # the torch side holds the same mixed weights


@pytest.mark.parametrize(
    ("which", "message"),
    [("low", "below the all-4-bit file ({:.2f} MB at group 32), the minimum"), ("high", "that is not mixed")],
)
def test_budget_outside_the_mixed_range_is_refused(tmp_path, capsys, which, message):
    model = _fragile_model_dir(tmp_path)
    low, extra = _sizes(model)
    mb = (low - 1) / 1e6 if which == "low" else (low + sum(extra.values())) / 1e6
    pipeline = tiny_pipeline(tmp_path, "refused", _stage("m", mb), data=DATA)
    assert main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"]) == EXIT_STAGE
    assert message.format(low / 1e6) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"head": "int8"}, "mixed: the lm_head is a unit"),
        ({"target": "onnxruntime-cpu"}, "mixed needs target: onnxruntime-genai"),
        ({"target": "{name: onnxruntime-genai, execution_provider: cuda}"}, "execution_provider cuda"),
        ({"method": "{name: checkpoint, folder: /nowhere}"}, "method checkpoint: its codes are fixed"),
    ],
    ids=["int8-head", "cpu-target", "cuda", "checkpoint"],
)
def test_mixed_refused_at_validate(tmp_path, capsys, change, message):
    pipeline = tiny_pipeline(tmp_path, "refused", _stage("m", 1.0, **change), data=DATA)
    assert main(["validate", str(pipeline)]) == EXIT_CONFIG
    assert message in capsys.readouterr().err


def test_too_few_calibration_windows_for_the_held_apart_slice(tmp_path, capsys):
    _fragile_model_dir(tmp_path)
    stages = _stage("m", 0.25, method="{name: gptq, samples: 3}")
    pipeline = tiny_pipeline(tmp_path, "short", stages, data=DATA)  # 4 windows: 3 for GPTQ, 1 left of 2
    assert main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"]) == EXIT_STAGE
    assert "sensitivity needs 5 calibration windows (method.samples 3 + mixed.windows 2 held apart)" in (
        capsys.readouterr().err
    )


def test_restart_at_the_unit_layer_gives_the_full_forward_sensitivities():
    """Probes restarted at the unit's layer from the recorded hidden states (the default) equal probes that run
    the whole model, on a 3-layer tiny Llama at 4 bits (so layers 1 and 2 really restart): KL within 1e-9 nats
    (measured: equal to the last bit on this machine), the 4-bit weights put back after the pass."""
    from compress.quant.mixed import LayerRestart, model_logits, unit_layer, unit_sensitivity

    model, reference_model = tiny_llama(tie=True, layers=3), tiny_llama(tie=True, layers=3)
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    rtn_quantize_model(model, config=WeightQuantConfig(group_size=32), layers_filter=EVERY_LINEAR)
    eight = {
        n: rtn_quantize(w, WeightQuantConfig(bits=8, group_size=32)).dequantize(torch.float32)
        for n, w in floats.items()
    }
    rng = np.random.default_rng(3)
    batches = [{"input_ids": torch.from_numpy(rng.integers(3, 1000, size=(1, 24)))} for _ in range(2)]
    reference = model_logits(reference_model, batches)
    units = fused_units(_shapes(model))
    assert sorted({unit_layer(u) for u in units}, key=str) == [0, 1, 2, None]  # None: the tied lm_head
    four = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    fast = unit_sensitivity(model, units, eight, batches, reference)
    full = unit_sensitivity(model, units, eight, batches, reference, restart=False)
    assert fast["kl_4bit"] == pytest.approx(full["kl_4bit"], abs=1e-9)
    assert [r["node"] for r in fast["units"]] == [r["node"] for r in full["units"]]
    for a, b in zip(fast["units"], full["units"], strict=True):
        assert a["kl_8bit"] == pytest.approx(b["kl_8bit"], abs=1e-9), a["node"]
    assert len({round(r["gain"], 9) for r in full["units"]}) > 5  # the units differ: the comparison means something
    modules = dict(model.named_modules())
    assert all(torch.equal(modules[n].weight, w) for n, w in four.items())
    restart = LayerRestart(model, batches)  # a restart from layer 2 is the full model's logits
    for a, b in zip(restart.logits(2), model_logits(model, batches), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert all(type(m).__name__ == "LlamaDecoderLayer" for m in model.model.layers)  # the layers are put back
