"""Every decoder architecture map through export (KV cache, parity), INT8 and INT4 (RTN, GPTQ, AWQ).

One tiny random-weight model per entry of `ARCHITECTURES` (hidden 64, 2 layers, 4 heads / 2 KV heads,
intermediate 128, vocab 1000); Gemma 2/3 alternate a sliding-window layer (window 4) and a global one, so
the 9-token parity prompt and its 8 decode steps cross the window. Random weights: no quality figure here,
only agreement with the float model within stated bounds.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.errors import ConfigError
from compress.families.causal_lm.archs import ARCHITECTURES, arch_of
from compress.families.causal_lm.export import check_parity, export_decoder, lm_head_matmul
from compress.families.causal_lm.sessions import OrtCausalLM

VOCAB = 1000
ALTERNATING = ["sliding_attention", "full_attention"]
PROMPT = list(range(3, 12))  # 9 tokens: longer than the sliding window of 4


def _config(name: str, kv_heads: int = 2):
    import transformers as tf

    common = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        intermediate_size=128,
        vocab_size=VOCAB,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    gemma = dict(head_dim=16, sliding_window=4, layer_types=ALTERNATING)
    return {
        "llama": lambda: tf.LlamaConfig(**common),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=4),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=16),
        "gemma2": lambda: tf.Gemma2Config(**common, **gemma),
        "gemma3": lambda: tf.Gemma3TextConfig(**common, **gemma, rope_local_base_freq=100.0),
        "phi3": lambda: tf.Phi3Config(**common),
    }[name]()


TINY = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


def tiny_decoder(name: str, *, kv_heads: int = 2, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(name, kv_heads)).eval()
    with torch.no_grad():  # Gemma's norms start at 0 (x_hat * (1 + 0)): give every norm weight some spread
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal to quantization-noise ratio of `approx` against `ref`, in dB (scale-free)."""
    return float(20 * torch.log10(ref.norm() / (ref - approx).norm()))


def calib(n: int = 4, length: int = 12, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (1, length), generator=g) for _ in range(n)]


def logits(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=b, use_cache=False).logits for b in batches])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one torch thread is faster than two fighting over a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_architecture_has_a_tiny_model() -> None:
    """A new map entry without a tiny config here fails (and so is exercised by every test below)."""
    assert set(TINY) == set(ARCHITECTURES)
    for name in TINY:
        assert arch_of(tiny_decoder(name)).name == name


@pytest.fixture(scope="module", params=TINY)
def exported(request, tmp_path_factory):
    model = tiny_decoder(request.param)
    path = export_decoder(model, tmp_path_factory.mktemp(request.param) / "model.onnx")
    return request.param, model, path


def test_export_kv_cache_parity(exported) -> None:
    """Prefill + 8 cached decode steps within 1e-4 of torch (float32 reassociation only), same greedy tokens."""
    name, model, path = exported
    report = check_parity(model, OrtCausalLM(path), PROMPT, atol=1e-4, steps=8)
    assert report.ok and report.tokens_match, (name, report)


def test_tied_embedding_stored_once(exported) -> None:
    """A tied table is one initializer, also behind Gemma 2's soft-capped logits (MatMul -> Div, Tanh, Mul)."""
    import onnx

    name, model, path = exported
    proto = onnx.load(str(path))
    tables = [t.name for t in proto.graph.initializer if sorted(t.dims) == [64, VOCAB]]
    assert lm_head_matmul(proto.graph) is not None, name
    assert len(tables) == (1 if model.config.tie_word_embeddings else 2), (name, tables)


@pytest.mark.parametrize("method", ["weight-only", "dynamic"])
def test_int8(exported, tmp_path, method) -> None:
    """INT8 logits of the ONNX decoder: weight-only >= 30 dB SQNR against float; dynamic W8A8 >= 15 dB."""
    from compress.quant.algorithms.int8_matmul import lm_head_nodes, quantize_int8

    name, model, path = exported
    out = quantize_int8(path, tmp_path / "int8.onnx", method=method)
    ids = np.asarray([PROMPT], dtype=np.int64)
    ref = torch.from_numpy(OrtCausalLM(path, threads=1).logits(ids))
    got = torch.from_numpy(OrtCausalLM(out, threads=1).logits(ids))
    assert sqnr_db(ref, got) >= (30 if method == "weight-only" else 15), name
    assert lm_head_nodes(path), f"{name}: the lm_head MatMul is not found (lm_head: float would be ignored)"


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("name", TINY)
def test_int4_logits_close(name: str, method: str) -> None:
    """INT4 g32 logits against float on held-out tokens: >= 10 dB SQNR (4-bit weights give ~15-20 dB here)."""
    from compress.quant.algorithms.awq import AWQConfig, awq_quantize_model
    from compress.quant.algorithms.gptq import GPTQConfig, gptq_quantize_model
    from compress.quant.algorithms.rtn import rtn_quantize_model
    from compress.quant.primitives.weight import WeightQuantConfig

    model = tiny_decoder(name)
    held_out = calib(2, seed=1)
    ref = logits(model, held_out)
    if method == "rtn":
        qws = rtn_quantize_model(model, config=WeightQuantConfig(group_size=32))
    elif method == "gptq":
        qws = gptq_quantize_model(model, calib(), config=GPTQConfig(group_size=32))
    else:
        qws = awq_quantize_model(model, calib(), config=AWQConfig(group_size=32, n_grid=5, clip_grid=5))
    arch = arch_of(model)
    assert len(qws) == 2 * len(arch.linears), sorted(qws)
    assert sqnr_db(ref, logits(model, held_out)) >= 10, name


def _fold_all(model, scales: dict[tuple[int, int], torch.Tensor], inverse: bool = False) -> list[str]:
    """Apply every applicable scale group of the map with `scales[(layer, group)]`; names of those skipped."""
    from compress.quant.algorithms.awq import fold_scale, producer_rows

    arch = arch_of(model)
    skipped = []
    with torch.no_grad():
        for i, layer in enumerate(model.get_submodule(arch.layers)):
            for j, group in enumerate(arch.scale_groups):
                producer, consumers = layer.get_submodule(group.producer), group.consumers
                rows = producer_rows(group, producer, layer.get_submodule(consumers[0]))
                if isinstance(rows, str):
                    skipped.append(group.producer)
                    continue
                width = layer.get_submodule(consumers[0]).in_features
                s = scales.setdefault((i, j), torch.rand(width, generator=torch.Generator().manual_seed(j)) * 3 + 0.3)
                s = 1 / s if inverse else s
                fold_scale(producer, s, norm_offset=arch.norm_offset, rows=rows)
                for c in consumers:
                    layer.get_submodule(c).weight.mul_(s)
    return skipped


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("name", TINY)
def test_awq_fold_is_exact(name: str, kv_heads: int) -> None:
    """Folding random scales (0.3..3.3) keeps the logits within 1e-5; folding 1/s gives back the weights.

    Without grouped-query attention every group of the map folds (Phi-3: the v third of qkv_proj, the up half
    of gate_up_proj; Gemma: norms with the +1 offset); with it, v -> o is the only group skipped.
    """
    model = tiny_decoder(name, kv_heads=kv_heads)
    before = copy.deepcopy(model.state_dict())
    batches = calib(2)
    ref = logits(model, batches)
    scales: dict[tuple[int, int], torch.Tensor] = {}
    skipped = _fold_all(model, scales)
    arch = arch_of(model)
    assert skipped == ([] if kv_heads == 4 else [arch.scale_groups[1].producer] * 2), skipped
    torch.testing.assert_close(logits(model, batches), ref, rtol=0, atol=1e-5)
    _fold_all(model, scales, inverse=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=1e-5, atol=1e-6, msg=key)


def test_awq_reports_groups_it_cannot_fold() -> None:
    from compress.quant.algorithms.awq import AWQConfig, awq_quantize_model

    skipped: list[str] = []
    awq_quantize_model(
        tiny_decoder("phi3"), calib(2), config=AWQConfig(group_size=32, n_grid=2), on_skip=skipped.append
    )
    assert len(skipped) == 2 and all("qkv_proj" in m and "grouped-query" in m for m in skipped), skipped


# -- every layer gets its own inputs (Gemma 3: a sliding layer with local RoPE, then a global one) -----------
def _true_layer_inputs(model, layer_index: int, batches):
    """What the model itself passes layer `layer_index`, batch by batch (a pre-hook on that layer only)."""
    seen = []
    layer = model.get_submodule(arch_of(model).layers)[layer_index]
    handle = layer.register_forward_pre_hook(lambda _m, a, k: seen.append((a, k)), with_kwargs=True)
    try:
        logits(model, batches)
    finally:
        handle.remove()
    return seen


def _same(a, b) -> bool:
    """Equal masks; None is SDPA's plain causal mask (no tensor needed)."""
    return a is b if a is None or b is None else torch.equal(a, b)


def test_each_layer_gets_the_arguments_the_model_gives_it() -> None:
    from compress.quant.algorithms.sequential import capture_layer_calls

    model = tiny_decoder("gemma3")
    batches = calib(2)
    layers = model.get_submodule(arch_of(model).layers)
    hidden, calls = capture_layer_calls(model, layers, batches)
    for b, (_args, kwargs) in enumerate(_true_layer_inputs(model, 1, batches)):
        mine = calls[1][b].kwargs
        cos, sin = mine["position_embeddings"]
        torch.testing.assert_close(cos, kwargs["position_embeddings"][0], rtol=0, atol=0)
        torch.testing.assert_close(sin, kwargs["position_embeddings"][1], rtol=0, atol=0)
        assert _same(mine["attention_mask"], kwargs["attention_mask"])
        layer0 = calls[0][b].kwargs
        assert not torch.equal(layer0["position_embeddings"][0], cos)  # local RoPE base 100 vs global 10000
        assert not _same(layer0["attention_mask"], mine["attention_mask"])  # window 4 vs plain causal
    assert torch.equal(hidden[0], _true_layer_inputs(model, 0, batches)[0][0][0])


def _reference_gptq(model, batches, cfg):
    """GPTQ by groups with each group's Hessian from a full-model forward: the true inputs, slowly."""
    from compress.quant.algorithms.gptq import quantize_with_hooks
    from compress.quant.algorithms.sequential import default_filter, layer_linear_groups

    arch = arch_of(model)
    result = {}
    for i, layer in enumerate(model.get_submodule(arch.layers)):
        for members in layer_linear_groups(layer, arch, default_filter, f"{arch.layers}.{i}."):
            result.update(quantize_with_hooks(lambda: logits(model, batches), members, cfg))
    return result


def _reference_awq(model, batches, cfg):
    """AWQ layer by layer on the inputs the (partly quantized) model really gives each layer."""
    from compress.quant.algorithms.awq import awq_quantize_layer
    from compress.quant.algorithms.sequential import default_filter

    arch = arch_of(model)
    result = {}
    for i, layer in enumerate(model.get_submodule(arch.layers)):
        inputs = _true_layer_inputs(model, i, batches)
        result.update(awq_quantize_layer(layer, inputs, default_filter, f"{arch.layers}.{i}.", cfg, arch))
    return result


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_sequential_quantization_matches_true_per_layer_inputs(method: str) -> None:
    """The driver's codes equal a reference fed by the model's own per-layer inputs (all but rare ties)."""
    from compress.quant.algorithms.awq import AWQConfig, awq_quantize_model
    from compress.quant.algorithms.gptq import GPTQConfig, gptq_quantize_model

    model = tiny_decoder("gemma3")
    reference_model = copy.deepcopy(model)
    batches = calib(3)
    if method == "gptq":
        cfg = GPTQConfig(group_size=32)
        got = gptq_quantize_model(model, batches, config=cfg)
        want = _reference_gptq(reference_model, batches, cfg)
    else:
        cfg = AWQConfig(group_size=32, n_grid=5, clip_grid=5)
        got = awq_quantize_model(model, batches, config=cfg)
        want = _reference_awq(reference_model, batches, cfg)
    assert sorted(got) == sorted(want)
    for key in want:
        same = (got[key].qweight == want[key].qweight).float().mean()
        assert same >= 0.999, (key, float(same))  # float ties at a rounding boundary are the only leeway
        torch.testing.assert_close(got[key].scales, want[key].scales, rtol=1e-4, atol=1e-7)


# -- INT4 through ONNX (the stage's path: quantize in torch, export, rewrite, parity) ------------------------
def test_int4_onnx_rewrite_parity(exported, tmp_path: Path) -> None:
    """Every quantized Linear of the float export becomes MatMulNBits (found by its float value, as the stage
    does); ONNX logits then match the dequantized torch model within 1e-3."""
    from compress.quant.algorithms.rtn import rtn_quantize_model
    from compress.quant.primitives.weight import WeightQuantConfig
    from compress.quant.targets.onnx_rewrite import float_weights_of, rewrite_onnx_file

    name, model, path = exported
    quantized = copy.deepcopy(model)
    qws = rtn_quantize_model(quantized, config=WeightQuantConfig(group_size=32))
    out = tmp_path / "int4.onnx"
    report = rewrite_onnx_file(path, out, qws, float_weights_of(model, list(qws)), accuracy_level=0)
    assert sorted(report.replaced) == sorted(qws), name
    parity = check_parity(quantized, OrtCausalLM(out), PROMPT, atol=1e-3, steps=4, raise_on_failure=False)
    assert parity.ok, (name, parity)


# -- refusals: a source without a map, a non-decoder ---------------------------------------------------------
def _save(model, folder: Path) -> str:
    from llm_toys import tiny_tokenizer  # tests/ is on sys.path (tests/conftest.py)

    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return f"hf:{folder}"


@pytest.fixture(scope="module")
def foreign_folders(tmp_path_factory) -> dict[str, str]:
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    tmp = tmp_path_factory.mktemp("foreign")
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB))
    return {"bert": _save(bert, tmp / "bert"), "gpt2": _save(gpt2, tmp / "gpt2")}


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("bert", ["'bert'", "is not a decoder", "text-encoder"]),
        ("gpt2", ["'gpt2'", "no architecture map", "supported: gemma2"]),
    ],
)
def test_validate_refuses_sources_without_a_map(foreign_folders, tmp_path, capsys, kind, words) -> None:
    """Known before work: exit 2 at `validate`, naming model.source, and nothing is run."""
    from compress.cli import main

    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        f'name: p\nmodel: {{family: causal-lm, source: "{foreign_folders[kind]}"}}\n'
        "data: {window: 16, evaluation_windows: 1, calibration_windows: 1}\nstages:\n  - export: {}\ngates: {}\n"
    )
    assert main(["validate", str(pipeline)]) == 2
    captured = capsys.readouterr()
    out = " ".join((captured.out + captured.err).split())
    assert "model.source" in out and all(w in out for w in words), out
    assert main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 2
    assert not (tmp_path / "runs" / "p" / "manifest.json").exists()


def test_load_refuses_what_validate_could_not_see(foreign_folders, tmp_path) -> None:
    """At load: the config is read first, so a BERT folder is never built as BertLMHeadModel."""
    from compress.families.causal_lm.model_io import load_causal_lm

    with pytest.raises(ConfigError, match="is not a decoder; the text-encoder family"):
        load_causal_lm(foreign_folders["bert"], cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="'gpt2' has no architecture map; supported: gemma2, gemma3_text, llama"):
        load_causal_lm(foreign_folders["gpt2"], cache_dir=tmp_path)


def bert_factory():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))


def test_python_factory_of_a_non_decoder_is_refused(tmp_path) -> None:
    from compress.families.causal_lm.model_io import load_causal_lm

    with pytest.raises(ConfigError, match=r"python:test_decoder_archs:bert_factory: model_type 'bert' \(BertModel\)"):
        load_causal_lm("python:test_decoder_archs:bert_factory", cache_dir=tmp_path)


def test_gguf_architecture_read_from_the_header(tmp_path) -> None:
    """A GGUF's general.architecture decides before conversion (llama.cpp's gemma3 is gemma3_text)."""
    from gguf import GGUFWriter

    from compress.families.causal_lm.model_io import source_decoder_problem

    def write(arch: str) -> Path:
        path = tmp_path / f"{arch}.gguf"
        writer = GGUFWriter(str(path), arch)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    assert source_decoder_problem(f"gguf:{write('gemma3')}") is None
    problem = source_decoder_problem(f"gguf:{write('falcon')}")
    assert problem is not None and "'falcon' has no architecture map; supported:" in problem


def test_a_mapped_folder_passes_validate(tmp_path) -> None:
    from compress.families.causal_lm.model_io import source_decoder_problem

    source = _save(tiny_decoder("gemma3"), tmp_path / "gemma3")
    assert json.loads((tmp_path / "gemma3" / "config.json").read_text())["model_type"] == "gemma3_text"
    assert source_decoder_problem(source) is None


# -- through the runner: the adapter loads the saved folder, quantizes, exports, checks parity ----------------
@pytest.mark.slow  # ~30 s per run on a shared CPU
@pytest.mark.parametrize("name", ["gemma3", "phi3"])
def test_pipeline_export_int8_int4_awq(name: str, tmp_path: Path) -> None:
    """Gemma 3 (sliding layers, norm offset, tied scaled embedding) and Phi-3 (fused projections) end to end."""
    import yaml
    from toys import run_quietly

    source = _save(tiny_decoder(name), tmp_path / "model")
    pipeline = tmp_path / f"{name}.yaml"
    pipeline.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "model": {"family": "causal-lm", "source": source},
                "data": {"window": 16, "evaluation_windows": 2, "calibration_windows": 2, "generation_tokens": 4},
                "stages": [
                    {"export": {"name": "onnx-fp32", "atol": 1e-4}},
                    {"quantize": {"precision": "int8", "name": "int8"}},
                    {
                        "quantize": {
                            "precision": "int4",
                            "method": {"name": "awq", "samples": 2},
                            "group_size": 32,
                            "input": "source",
                            "name": "int4-awq",
                            "target": {"name": "onnxruntime-cpu", "accuracy_level": 0},
                            "parity_atol": 1e-3,
                        }
                    },
                ],
                "gates": {},
            }
        )
    )
    code, _, records = run_quietly(pipeline, tmp_path / "runs", "--no-bench")
    assert code == 0
    assert records["onnx-fp32"]["evaluation"]["vs_baseline"]["greedy_identical"] == 100.0
    info = records["int4-awq"]["artifact"]["info"]
    assert info["layers_quantized"] == 2 * len(ARCHITECTURES[name].linears)
    # GQA (2 KV heads for 4): v -> o cannot fold, once per layer; Phi-3's fused qkv is named as such
    assert len(info["awq_groups_unscaled"]) == 2
    assert all(("qkv_proj" if name == "phi3" else "v_proj") in m for m in info["awq_groups_unscaled"])


def test_int4_head_and_tied_scaled_embedding_gemma2(tmp_path: Path) -> None:
    """lm_head at 4 bits on Gemma 2: the untied (V, H) table becomes a quantized Gather feeding the sqrt(H)
    scaling, and the soft-capped logits still match the dequantized torch model within 1e-3."""
    from compress.quant.algorithms.rtn import rtn_quantize, rtn_quantize_model
    from compress.quant.primitives.weight import WeightQuantConfig
    from compress.quant.targets.onnx_rewrite import float_weights_of, rewrite_onnx_file
    from compress.stages.quantize.int4 import _untie_for_export

    model = tiny_decoder("gemma2")
    qws = rtn_quantize_model(model, config=WeightQuantConfig(group_size=32))
    qws["lm_head"] = rtn_quantize(model.lm_head.weight, WeightQuantConfig(group_size=32))
    with torch.no_grad():
        model.lm_head.weight.copy_(qws["lm_head"].dequantize())
    embeddings = _untie_for_export(model, "lm_head")
    assert embeddings == {"model.embed_tokens": "lm_head"}
    fp = export_decoder(model, tmp_path / "fp.onnx")
    weights = float_weights_of(model, list(qws) + list(embeddings))
    report = rewrite_onnx_file(
        fp, tmp_path / "q.onnx", qws, weights, accuracy_level=0, embeddings={n: qws[s] for n, s in embeddings.items()}
    )
    assert sorted(report.replaced) == sorted([*qws, *embeddings])
    assert check_parity(model, OrtCausalLM(tmp_path / "q.onnx"), PROMPT, atol=1e-3, steps=4, raise_on_failure=False).ok
