"""onnxruntime-genai's fused decoder graph on a tiny random Llama, from its own weights and from ours.

Logits come from ONNX Runtime (an InferenceSession on the builder's model.onnx with an empty past):
the graph outputs logits for every position, which the GenAI Generator does not hand back in full.
"""

from __future__ import annotations

import collections
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from llm_toys import VOCAB, tiny_llama, tiny_tokenizer
from onnx import numpy_helper

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'compress[llm]')")

from compress.genai.build import build_fused_decoder  # noqa: E402
from compress.quant.algorithms.gptq import GPTQConfig, gptq_quantize_model  # noqa: E402
from compress.quant.algorithms.rtn import rtn_quantize_model  # noqa: E402
from compress.quant.primitives.packing import MatMulNBitsTensors, unpack_matmul_nbits  # noqa: E402
from compress.quant.primitives.weight import WeightQuantConfig  # noqa: E402

HIDDEN, KV_HEADS, HEAD = 64, 2, 16
IDS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 17)).astype(np.int64)
EVERY_LINEAR = lambda name, module: True  # noqa: E731 - the lm_head too


def _save(folder: Path, tie: bool) -> tuple[Path, torch.nn.Module]:
    model = tiny_llama(tie=tie)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("genai") / "hf-tied", tie=True)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("genai") / "hf-untied", tie=False)


def _graph(out: Path, *, data: bool = True) -> onnx.ModelProto:
    return onnx.load(str(out / "model.onnx"), load_external_data=data)


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _ort_logits(out: Path) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": IDS, "attention_mask": np.ones_like(IDS)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((IDS.shape[0], KV_HEADS, 0, HEAD), np.float32)  # (B, kv_heads, 0, head)
    return session.run(["logits"], feed)[0]


def _torch_logits(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).logits.numpy()


def _nbits_weights(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    """``{node name: dequantized W [N, K]}`` of every MatMulNBits, read with our own unpacker."""
    inits = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}  # writable for torch
    out = {}
    for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
        attrs = {a.name: a.i for a in node.attribute}
        zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
        t = MatMulNBitsTensors(
            inits[node.input[1]], inits[node.input[2]], zp, attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        )
        out[node.name] = unpack_matmul_nbits(t).dequantize()
    return out


def _ours_fp16_scales(qw) -> torch.Tensor:
    """Our dequantized weight with the scales rounded to fp16, the AutoGPTQ layout's scale type."""
    gi = qw.group_index()
    scales = qw.scales.half().float()
    return (qw.qweight.float() - qw.zeros.float()[:, gi]) * scales[:, gi]


def _expected_nodes(qws) -> dict[str, torch.Tensor]:
    """Our weights under the builder's node names (q, k, v packed along N)."""
    expected = {}
    for i in range(2):
        p = f"model.layers.{i}"
        attn = [_ours_fp16_scales(qws[f"{p}.self_attn.{x}_proj"]) for x in "qkv"]
        expected[f"/model/layers.{i}/attn/qkv_proj/MatMulNBits"] = torch.cat(attn)
        expected[f"/model/layers.{i}/attn/o_proj/MatMulNBits"] = _ours_fp16_scales(qws[f"{p}.self_attn.o_proj"])
        for x in ("gate", "up", "down"):
            expected[f"/model/layers.{i}/mlp/{x}_proj/MatMulNBits"] = _ours_fp16_scales(qws[f"{p}.mlp.{x}_proj"])
    if "lm_head" in qws:
        expected["/lm_head/MatMulNBits"] = _ours_fp16_scales(qws["lm_head"])
    return expected


def test_fp32_fused_graph_matches_torch(tied, tmp_path, capsys):
    folder, model = tied
    out = build_fused_decoder(folder, tmp_path / "fp32", precision="fp32")
    assert capsys.readouterr() == ("", "")  # the builder's prints and progress bars stay quiet
    graph = _graph(out)
    ops = _ops(graph)
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] >= 3
    qkv = [n for n in graph.graph.node if n.name == "/model/layers.0/attn/qkv_proj/MatMul"]
    inits = {t.name: t for t in graph.graph.initializer}
    assert list(inits[qkv[0].input[1]].dims) == [HIDDEN, HIDDEN + 2 * KV_HEADS * HEAD]  # packed QKV [K, q+2kv]
    ours, theirs = _ort_logits(out), _torch_logits(model)
    # fp32 both sides, fused kernels sum in another order: measured 3.6e-7 on logits of magnitude ~1.4
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "model.onnx"


@pytest.mark.parametrize("method", ["rtn-asym", "gptq-sym"])
def test_int4_from_our_weights_is_our_weights(tied, tmp_path, method):
    folder, _ = tied
    model = tiny_llama(tie=True)
    if method == "rtn-asym":
        qws = rtn_quantize_model(model, config=WeightQuantConfig(group_size=32), layers_filter=EVERY_LINEAR)
        name = "model.layers.0.self_attn.q_proj"  # the extreme zero points AutoGPTQ v1 cannot store: 0 and 15
        zeros = qws[name].zeros.clone()
        zeros[0, 0], zeros[1, 0] = 0, 15
        qws[name] = replace(qws[name], zeros=zeros)
    else:
        batches = [torch.from_numpy(np.random.default_rng(s).integers(3, VOCAB, size=(2, 24))) for s in range(4)]
        cfg = GPTQConfig(group_size=32, symmetric=True)
        qws = gptq_quantize_model(model, batches, config=cfg, layers_filter=EVERY_LINEAR)
    if "lm_head" not in qws:  # a tied lm_head is skipped by the quantizer's walk: the table it shares is the embedding
        qws = {
            **qws,
            **rtn_quantize_model(
                model,
                config=WeightQuantConfig(group_size=32, symmetric=method != "rtn-asym"),
                layers_filter=lambda n, m: n == "lm_head",
            ),
        }
    out = build_fused_decoder(folder, tmp_path / "int4", precision="int4", quantized=qws, accuracy_level=1)
    graph = _graph(out)
    got, expected = _nbits_weights(graph), _expected_nodes(qws)
    assert set(got) == set(expected)
    for name, w in expected.items():
        assert torch.equal(got[name], w), name  # codes and zero points exact, scales as fp16
    # the same model in torch, with our dequantized weights (scales as fp16 too)
    with torch.no_grad():
        modules = dict(model.named_modules())
        for name, qw in qws.items():
            modules[name].weight.copy_(_ours_fp16_scales(qw))
    # accuracy_level 1 = fp32 activations: only summation order differs (measured <1e-5)
    np.testing.assert_allclose(_ort_logits(out), _torch_logits(model), atol=1e-4, rtol=0)


def test_default_accuracy_level_int8_activations_stay_close(tied, tmp_path):
    folder, _ = tied
    model = tiny_llama(tie=True)
    qws = rtn_quantize_model(model, config=WeightQuantConfig(group_size=32), layers_filter=EVERY_LINEAR)
    out = build_fused_decoder(folder, tmp_path / "int4", precision="int4", quantized=qws)
    levels = {
        a.i
        for n in _graph(out).graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }
    assert levels == {4}  # the builder's CPU default: activations quantized to int8 per block
    ours, theirs = _ort_logits(out), _torch_logits(model)
    # int8 activations against an fp32 torch model: measured 5.4e-3 on logits of magnitude ~1.4
    np.testing.assert_allclose(ours, theirs, atol=2e-2, rtol=0)
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.9


def test_cuda_flavour_is_built_not_run(tied, tmp_path):
    folder, _ = tied
    qws = rtn_quantize_model(tiny_llama(tie=True), config=WeightQuantConfig(group_size=32), layers_filter=EVERY_LINEAR)
    out = build_fused_decoder(folder, tmp_path / "cuda", precision="int4", quantized=qws, execution_provider="cuda")
    graph = _graph(out)
    ops = _ops(graph)
    assert ops["MatMulNBits"] == 11 and ops["GroupQueryAttention"] == 2 and ops["GatherBlockQuantized"] == 1
    logits = next(o for o in graph.graph.output if o.name == "logits")
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16  # fp16 I/O for the CUDA kernels
    assert {
        a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"
    } == {0}
    session = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert "cuda" in session["provider_options"][0]
    assert set(_nbits_weights(graph)) == set(_expected_nodes(qws))


def _external_bytes(model: onnx.ModelProto) -> dict[str, int]:
    return {
        t.name: int({e.key: e.value for e in t.external_data}["length"])
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    }


def test_tied_embedding_stored_once_in_int4_file(tied, tmp_path):
    folder, _ = tied
    qws = rtn_quantize_model(tiny_llama(tie=True), config=WeightQuantConfig(group_size=32), layers_filter=EVERY_LINEAR)
    out = build_fused_decoder(folder, tmp_path / "int4", precision="int4", quantized=qws)
    graph = _graph(out, data=False)
    sizes = _external_bytes(graph)
    assert sum(sizes.values()) <= (out / "model.onnx.data").stat().st_size <= sum(sizes.values()) + 4096 * len(sizes)
    inits = {t.name: list(t.dims) for t in graph.graph.initializer}
    n_blocks = HIDDEN // 32
    vocab_sized = sorted(n for n, d in inits.items() if d and d[0] in (VOCAB, VOCAB * n_blocks))  # per-token rows
    assert vocab_sized == ["lm_head.MatMulNBits.qweight", "lm_head.MatMulNBits.qzeros", "lm_head.MatMulNBits.scales"]
    table = VOCAB * HIDDEN // 2 + VOCAB * n_blocks * 4 + VOCAB * -(-n_blocks // 2)  # codes + fp32 scales + zeros
    assert sum(sizes[n] for n in vocab_sized) == table
    readers = [n.op_type for n in graph.graph.node if "lm_head.MatMulNBits.qweight" in n.input]
    assert sorted(readers) == ["MatMulNBits", "Reshape"]  # the Reshape feeds GatherBlockQuantized


def test_float_lm_head_keeps_one_float_table(tied, tmp_path):
    folder, model = tied
    qws = rtn_quantize_model(tiny_llama(tie=True), config=WeightQuantConfig(group_size=32))  # lm_head not included
    out = build_fused_decoder(folder, tmp_path / "int4", precision="int4", quantized=qws, lm_head="float")
    graph = _graph(out)
    tables = [t.name for t in graph.graph.initializer if list(t.dims) == [HIDDEN, VOCAB]]
    assert tables == ["lm_head.MatMul.weight"] and _ops(graph)["GatherBlockQuantized"] == 0
    assert set(_nbits_weights(graph)) == set(_expected_nodes(qws))


def test_untied_int4_from_our_weights(untied, tmp_path):
    folder, _ = untied
    model = tiny_llama(tie=False)
    qws = rtn_quantize_model(model, config=WeightQuantConfig(group_size=32), layers_filter=EVERY_LINEAR)
    out = build_fused_decoder(folder, tmp_path / "int4", precision="int4", quantized=qws, accuracy_level=1)
    graph = _graph(out)
    got = _nbits_weights(graph)
    assert all(torch.equal(got[n], w) for n, w in _expected_nodes(qws).items())
    assert [
        list(t.dims) for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and VOCAB in t.dims
    ] == [[VOCAB, HIDDEN]]  # the embedding stays float; only the lm_head is 4-bit
    # torch keeps fp32 scales, the graph fp16 ones: measured 2.4e-4 on logits of magnitude ~1.4
    np.testing.assert_allclose(_ort_logits(out), _torch_logits(model), atol=1e-3, rtol=0)


def _rtn(group_size: int = 32, bits: int = 4, sym: bool = False):
    config = WeightQuantConfig(group_size=group_size, bits=bits, symmetric=sym)
    return rtn_quantize_model(tiny_llama(tie=True), config=config)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda q: {**q, "model.layers.0.self_attn.k_proj": _rtn(64)["model.layers.0.self_attn.k_proj"]}, "packs"),
        (lambda q: {**q, "model.layers.0.mlp.up_proj": _rtn(sym=True)["model.layers.0.mlp.up_proj"]}, "sym per"),
        (lambda q: _rtn(-1), "allowed a power of two >= 16"),
        (lambda q: {**q, "model.layers.0.mlp.up_proj": _rtn(bits=8)["model.layers.0.mlp.up_proj"]}, "not 4-bit"),
        (lambda q: {"model.layers.0.mlp.nope": q["model.layers.0.mlp.up_proj"]}, "name no Linear weight"),
    ],
    ids=["qkv-groups", "mixed-symmetry", "per-row", "8-bit", "unknown-name"],
)
def test_weights_the_builder_cannot_take_are_refused(tied, tmp_path, change, message):
    folder, _ = tied
    with pytest.raises(ValueError, match=message):
        build_fused_decoder(folder, tmp_path / "x", precision="int4", quantized=change(_rtn()))
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []  # no half-built folder left behind


def test_act_order_g_idx_is_refused(tied, tmp_path):
    folder, _ = tied
    batches = [torch.from_numpy(np.random.default_rng(s).integers(3, VOCAB, size=(2, 24))) for s in range(2)]
    qws = gptq_quantize_model(tiny_llama(tie=True), batches, config=GPTQConfig(group_size=32, static_groups=False))
    assert any(not qw.has_trivial_g_idx() for qw in qws.values())
    with pytest.raises(ValueError, match="static_groups=True"):
        build_fused_decoder(folder, tmp_path / "x", precision="int4", quantized=qws)


def test_bad_options_are_named(tied, tmp_path):
    folder, _ = tied
    with pytest.raises(ValueError, match="need precision 'int4' or 'int8'"):
        build_fused_decoder(folder, tmp_path / "x", precision="fp32", quantized=_rtn())
    with pytest.raises(ValueError, match="execution_provider = 'dml'; allowed: cpu, cuda"):
        build_fused_decoder(folder, tmp_path / "x", execution_provider="dml")
    with pytest.raises(ValueError, match="accuracy_level = 7"):
        build_fused_decoder(folder, tmp_path / "x", precision="int4", accuracy_level=7)
    config = json.loads((folder / "config.json").read_text())
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        build_fused_decoder(other, tmp_path / "x")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken: exists"):
        build_fused_decoder(folder, tmp_path / "taken")


def test_builder_failure_leaves_no_folder(tied, tmp_path, monkeypatch):
    from onnxruntime_genai.models import builder

    def boom(*args, **kwargs):
        print("builder log line")
        raise NotImplementedError("The model is not currently supported.")

    monkeypatch.setattr(builder, "create_model", boom)
    with pytest.raises(RuntimeError, match="not currently supported(.|\n)*builder log line"):
        build_fused_decoder(tied[0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_int8_lm_head_is_one_table_read_by_both(tied, tmp_path):
    folder, _ = tied
    model = tiny_llama(tie=True)
    qws = rtn_quantize_model(model, config=WeightQuantConfig(group_size=32))  # body ours, lm_head the builder's
    out = build_fused_decoder(
        folder, tmp_path / "int4", precision="int4", quantized=qws, lm_head="int8", accuracy_level=1
    )
    graph = _graph(out)
    head = next(n for n in graph.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/"))
    gather = next(n for n in graph.graph.node if n.op_type == "GatherBlockQuantized")
    reshape = next(n for n in graph.graph.node if n.output[0] == gather.input[0])
    assert {a.name: a.i for a in head.attribute}["bits"] == 8 == {a.name: a.i for a in gather.attribute}["bits"]
    assert reshape.input[0] == head.input[1] and gather.input[2] == head.input[2]  # the same initializers
    table = _nbits_weights(graph)[head.name]  # the builder's 8-bit RTN of the tied table, dequantized
    with torch.no_grad():
        modules = dict(model.named_modules())
        for name, qw in qws.items():
            modules[name].weight.copy_(_ours_fp16_scales(qw))
        model.lm_head.weight.copy_(table)  # tied: the embedding reads it too
    # fp32 activations (accuracy level 1); the graph runs, and embedding + head are that one table
    np.testing.assert_allclose(_ort_logits(out), _torch_logits(model), atol=1e-4, rtol=0)


def test_lm_head_twice_is_refused(tied, tmp_path):
    qws = rtn_quantize_model(tiny_llama(tie=True), config=WeightQuantConfig(group_size=32), layers_filter=EVERY_LINEAR)
    with pytest.raises(ValueError, match="lm_head = 'int8' but quantized holds our 4-bit 'lm_head'"):
        build_fused_decoder(tied[0], tmp_path / "x", precision="int4", quantized=qws, lm_head="int8")


# -- the 4-bit tied head by GPTQ -------------------------------------------------------------------------------
CALIB = [torch.from_numpy(np.random.default_rng(s).integers(3, VOCAB, size=(1, 48))) for s in range(4)]


def _head_inputs(model: torch.nn.Module) -> torch.Tensor:
    from compress.quant.algorithms.sequential import capture_module_inputs

    xs: list[torch.Tensor] = []
    assert capture_module_inputs(model, model.lm_head, CALIB, xs.append) == len(CALIB)
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])  # (tokens, hidden)


def _gptq_body_and_head(group_size: int = 32):
    from compress.quant.algorithms.gptq import gptq_quantize_head

    model = tiny_llama(tie=True)
    cfg = GPTQConfig(group_size=group_size)
    qws = gptq_quantize_model(model, CALIB, config=cfg)  # the body; the lm_head is left to the head pass
    x = _head_inputs(model)  # the quantized body's final-norm outputs, before the head is touched
    w_float = model.lm_head.weight.detach().clone()
    qws["lm_head"] = gptq_quantize_head(model, CALIB, "lm_head", cfg)
    return model, qws, x, w_float


def test_gptq_head_beats_rtn_on_its_calibration_inputs():
    from compress.quant.algorithms.rtn import rtn_quantize

    model, qws, x, w_float = _gptq_body_and_head()
    gptq = qws["lm_head"]
    rtn = rtn_quantize(w_float, WeightQuantConfig(group_size=32))
    reference = x @ w_float.T  # (tokens, vocab) float head outputs

    def output_error(qw) -> float:
        return float(((x @ qw.dequantize().T - reference) ** 2).sum())

    # GPTQ minimises this objective (up to its dampening): measured 0.73 of RTN's error here (seeded, deterministic)
    assert output_error(gptq) < 0.8 * output_error(rtn), (output_error(gptq), output_error(rtn))
    assert not torch.equal(gptq.qweight, rtn.qweight)
    # the tied table holds the head's dequantized codes: the embedding reads what the head multiplies with
    assert model.model.embed_tokens.weight is model.lm_head.weight
    assert torch.equal(model.lm_head.weight, gptq.dequantize(model.lm_head.weight.dtype))


def test_gptq_head_stored_once_and_runs_like_torch(tied, tmp_path):
    folder, _ = tied
    model, qws, _, _ = _gptq_body_and_head()
    out = build_fused_decoder(folder, tmp_path / "int4", precision="int4", quantized=qws, accuracy_level=1)
    graph = _graph(out)
    assert _ops(graph)["GatherBlockQuantized"] == 1
    # every vocab-sized tensor is one of the head's three: no float or second quantized copy of the table
    n_blocks = HIDDEN // 32
    vocab_sized = {t.name: t for t in graph.graph.initializer if t.dims and t.dims[0] in (VOCAB, VOCAB * n_blocks)}
    assert sorted(vocab_sized) == [
        "lm_head.MatMulNBits.qweight",
        "lm_head.MatMulNBits.qzeros",
        "lm_head.MatMulNBits.scales",
    ]
    codes, scales, zeros = (VOCAB * HIDDEN // 2, VOCAB * n_blocks * 4, VOCAB * -(-n_blocks // 2))  # fp32 scales
    assert sum(len(t.raw_data) for t in vocab_sized.values()) == codes + scales + zeros
    gathers = [n for n in graph.graph.node if n.op_type == "GatherBlockQuantized"]
    reshape = {n.output[0]: n for n in graph.graph.node if n.op_type == "Reshape"}
    assert reshape[gathers[0].input[0]].input[0] == "lm_head.MatMulNBits.qweight"  # the gather reads the head's codes
    got = _nbits_weights(graph)
    assert torch.equal(got["/lm_head/MatMulNBits"], _ours_fp16_scales(qws["lm_head"]))  # GPTQ's codes, fp16 scales
    # torch runs the dequantised weights with the scales rounded to fp16 as the graph stores them; at accuracy
    # level 1 (fp32 activations) only the summation order differs: measured 3.6e-7 on logits of magnitude ~1.4
    with torch.no_grad():
        for name, qw in qws.items():
            model.get_submodule(name).weight.copy_(_ours_fp16_scales(qw))
    np.testing.assert_allclose(_ort_logits(out), _torch_logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("method", "lm_head", "expected"),
    [
        ({"name": "gptq"}, "int4", "gptq"),
        ({"name": "awq", "then": "gptq"}, "int4", "gptq"),
        ({"name": "awq"}, "int4", "rtn"),
        ("rtn", "int8", "rtn"),
        ({"name": "gptq"}, "float", None),
    ],
)
def test_head_quantizer_follows_the_method(method, lm_head, expected):
    from compress.stages.quantize.int4 import Int4Options, head_quantizer

    options = Int4Options(precision="int4", method=method, lm_head=lm_head, target="onnxruntime-genai")
    assert head_quantizer(options) == expected
    # only a head whose codes changed (GPTQ, was RTN) changes the cache key of artifacts made before
    assert ("lm_head_quantizer" in options.cache_fields()) == (expected == "gptq")


def test_streamed_head_is_rtn_and_said_so():
    """The streamed path quantizes the head in row blocks by RTN whatever the method: info and key say RTN."""
    from compress.stages.quantize.genai_target import _head_quantizer
    from compress.stages.quantize.int4 import Int4Options, head_quantizer

    options = Int4Options(precision="int4", method="gptq", lm_head="int4", target="onnxruntime-genai", streamed=True)
    assert head_quantizer(options) == "rtn" and _head_quantizer(options) == "ours (RTN)"
    assert "lm_head_quantizer" not in options.cache_fields()


def test_pruned_head_graph_gives_the_same_logits_token_by_token(tied, tmp_path):
    """`prune_lm_head` (the builder's option, the genai target's default): the head reads the last position only;
    `OrtCausalLM` then runs the file token by token, and its full-sequence logits equal the unpruned graph's."""
    from compress.families.causal_lm.genai_engine import GeneratorBench
    from compress.families.causal_lm.sessions import OrtCausalLM

    folder, model = tied
    qws = rtn_quantize_model(model, config=WeightQuantConfig(group_size=32), layers_filter=EVERY_LINEAR)
    full = build_fused_decoder(folder, tmp_path / "full", precision="int4", quantized=qws)
    pruned = build_fused_decoder(folder, tmp_path / "pruned", precision="int4", quantized=qws, prune_lm_head=True)
    graph = _graph(pruned, data=False)
    logits = next(o for o in graph.graph.output if o.name == "logits")
    assert [d.dim_value for d in logits.type.tensor_type.shape.dim][1:] == [1, VOCAB]  # (B, 1, V)
    head = next(n for n in graph.graph.node if n.name == "/lm_head/MatMulNBits")
    assert _ops(graph)["Gather"] == _ops(_graph(full, data=False))["Gather"] + 1, "one Gather of the last position"
    assert _external_bytes(graph) == _external_bytes(_graph(full, data=False)), "the same weights"
    gather = next(n for n in graph.graph.node if n.output[0] == "/lm_head/prune/Gather/output_0")
    assert gather.input[0] == "/model/layers.2/final_norm_layernorm/output_0"  # the final norm's (B, T, H)
    assert head.input[0] == "/lm_head/prune/Unsqueeze/output_0"  # (B, 1, H)

    whole, cut = OrtCausalLM(full / "model.onnx"), OrtCausalLM(pruned / "model.onnx")
    assert (whole.last_logits_only, cut.last_logits_only) == (False, True)
    ours, theirs = cut.logits(IDS), whole.logits(IDS)
    assert ours.shape == theirs.shape == (*IDS.shape, VOCAB)
    # each position once as a cached decode step against one 17-token prefill: other kernels (GroupQueryAttention's
    # decode path), same int8-activation MatMulNBits per row; measured 2.4e-7 on logits of magnitude ~1.4
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    last, _ = cut.prefill(IDS, last_only=True)
    np.testing.assert_array_equal(last, whole.prefill(IDS, last_only=True)[0])  # one forward: the same last row
    assert cut.continue_greedy(IDS[0, :5].tolist(), 8) == whole.continue_greedy(IDS[0, :5].tolist(), 8)
    # the Generator (the deployable runtime) reads the pruned graph's logits: the same last-position logits
    gen_cut, _ = GeneratorBench(pruned).prefill(IDS[:1])
    gen_full, _ = GeneratorBench(full).prefill(IDS[:1])
    np.testing.assert_allclose(np.asarray(gen_cut), np.asarray(gen_full), atol=1e-5, rtol=0)
