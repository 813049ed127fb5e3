"""Decoder pruning through the architecture map: every mapped architecture prunes, saves and reloads.

Each architecture gets a tiny random-weight model of its real config class. Heads and MLP channels are
made dead first (their output weights zeroed), so removing them must leave the logits as they were: a
wrong row/column coupling for that layout (fused qkv, GQA re-indexing, biases, q/k norms) changes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compress.families.causal_lm.archs import ARCHITECTURES, DecoderArch, arch_of, decoder_layers
from compress.prune import PruneOptions, prune_decoder

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, KV, INTER, VOCAB = 64, 4, 2, 128, 100
COMMON = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=HEADS,
    num_key_value_heads=KV,
    intermediate_size=INTER,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# head_dim 24 where the config takes it explicitly: hidden (64) != heads x head_dim (96)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),  # q/k/v with biases
    "qwen3": lambda: transformers.Qwen3Config(head_dim=24, **COMMON),
    "gemma2": lambda: transformers.Gemma2Config(head_dim=24, query_pre_attn_scalar=24, sliding_window=4, **COMMON),
    "gemma3": lambda: transformers.Gemma3TextConfig(head_dim=24, query_pre_attn_scalar=24, sliding_window=4, **COMMON),
    "phi3": lambda: transformers.Phi3Config(**COMMON),  # fused qkv_proj and gate_up_proj
}


def tiny_decoder(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _head_dim(model: torch.nn.Module) -> int:
    return getattr(model.config, "head_dim", None) or HIDDEN // HEADS


def _weight(layer: torch.nn.Module, path: str) -> torch.Tensor:
    return layer.get_submodule(path).weight


def _kill_query_head(arch: DecoderArch, layer: torch.nn.Module, head: int, d: int) -> None:
    rows = slice(head * d, (head + 1) * d)  # q is the first block of a fused qkv
    with torch.no_grad():
        _weight(layer, arch.qkv or arch.q)[rows] = 0.0
        _weight(layer, arch.o)[:, rows] = 0.0  # the head now contributes nothing to the output


def _kill_kv_head(arch: DecoderArch, layer: torch.nn.Module, kv_head: int, d: int) -> None:
    rows = torch.arange(kv_head * d, (kv_head + 1) * d)
    with torch.no_grad():
        if arch.qkv:
            q_end = HEADS * d
            _weight(layer, arch.qkv)[torch.cat([q_end + rows, q_end + KV * d + rows])] = 0.0
        else:
            _weight(layer, arch.k)[rows] = 0.0
            _weight(layer, arch.v)[rows] = 0.0


def _kill_channels(arch: DecoderArch, layer: torch.nn.Module, channels: torch.Tensor) -> None:
    with torch.no_grad():
        if arch.gate_up:
            _weight(layer, arch.gate_up)[torch.cat([channels, INTER + channels])] = 0.0
        else:
            _weight(layer, arch.gate)[channels] = 0.0
            _weight(layer, arch.up)[channels] = 0.0
        _weight(layer, arch.down)[:, channels] = 0.0


def test_every_mapped_architecture_has_a_tiny_config_here() -> None:
    assert set(CONFIGS) == set(ARCHITECTURES), "add a tiny config for each new map entry"
    for name in ARCHITECTURES:
        assert arch_of(tiny_decoder(name)).name == name


@pytest.mark.parametrize("head_unit", ["query", "kv_group"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_pruning_dead_heads_and_channels_keeps_logits_and_round_trips(name: str, head_unit: str, tmp_path) -> None:
    model = tiny_decoder(name)
    arch, d = arch_of(model), _head_dim(model)
    for i, layer in enumerate(decoder_layers(model)):
        if head_unit == "query":  # one query head per KV group, a different one in each layer
            for group in range(KV):
                _kill_query_head(arch, layer, 2 * group + (i + group) % 2, d)
        else:  # a whole group: its KV head and both of its query heads
            for head in (2 * i, 2 * i + 1):
                _kill_query_head(arch, layer, head, d)
            _kill_kv_head(arch, layer, i, d)
        _kill_channels(arch, layer, torch.arange(i, INTER, 4))  # a quarter of the channels
    ids = _ids()
    before = _logits(model, ids)

    report = prune_decoder(model, PruneOptions(mlp_ratio=0.25, heads_ratio=0.5, head_unit=head_unit))

    assert report.arch == name and report.intermediate_size == (INTER, 96) and report.head_dim == d
    assert report.num_attention_heads == (HEADS, 2)
    assert report.num_key_value_heads == (KV, KV if head_unit == "query" else 1)
    # The same function computed with fewer terms: float32 summation order only (1e-5 absolute).
    pruned = _logits(model, ids)
    torch.testing.assert_close(pruned, before, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["num_attention_heads"], config["intermediate_size"], config["head_dim"]) == (2, 96, d)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(again, ids), pruned)


@pytest.mark.parametrize("name", ["gemma3", "llama"])
def test_head_counts_the_config_class_refuses_are_refused_before_any_change(name: str) -> None:
    # Llama and Gemma configs demand hidden % heads == 0 even with an explicit head_dim: 4 -> 3 heads of a
    # 64-wide model would prune in memory and then fail in save_pretrained.
    model = tiny_decoder(name, num_key_value_heads=1)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"4 -> 3 attention heads.*hidden size \(64\).*0\.50 \(2 heads\), 0\.75 \(1 heads\)"
    ):
        prune_decoder(model, PruneOptions(heads_ratio=0.25, mlp_ratio=0.5))
    assert model.config.num_attention_heads == HEADS and model.config.intermediate_size == INTER
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_an_explicit_head_dim_config_without_that_rule_saves_three_of_four_heads(tmp_path) -> None:
    model = tiny_decoder("qwen3", num_key_value_heads=1)  # hidden 64, head_dim 24, 4 heads on one KV head
    report = prune_decoder(model, PruneOptions(heads_ratio=0.25))
    assert report.num_attention_heads == (4, 3)
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.head_dim == 24 and again.config.num_attention_heads == 3
    assert torch.equal(_logits(again, _ids(1)), _logits(model, _ids(1)))


def test_a_decoder_without_a_map_is_refused_with_the_supported_ones() -> None:
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match="'gpt2' has no architecture map; supported: gemma2, gemma3_text, llama"):
        prune_decoder(model, PruneOptions(mlp_ratio=0.5))


# -- through the pipeline -------------------------------------------------------------------------------


def _pipeline(tmp: Path, arch: str, prune: str, **overrides) -> Path:
    from llm_toys import VOCAB as TOKENIZER_VOCAB
    from llm_toys import tiny_tokenizer

    model_dir = tmp / f"model-{arch}"
    tiny_decoder(arch, vocab_size=TOKENIZER_VOCAB, **overrides).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    path = tmp / f"{arch}.yaml"
    path.write_text(f"""name: prune-{arch}
model: {{family: causal-lm, source: "hf:{model_dir}"}}
data: {{window: 16, evaluation_windows: 2, calibration_windows: 2, generation_tokens: 2, prompts: ["The for"]}}
stages:
  - prune: {prune}
""")
    return path


def test_prune_stage_on_a_qwen3_with_explicit_head_dim(tmp_path) -> None:
    from toys import run_quietly

    from compress.cli import EXIT_OK

    pipeline = _pipeline(
        tmp_path, "qwen3", "{importance: wanda, mlp_ratio: 0.5, heads_ratio: 0.5, round_to: 16, samples: 2}"
    )
    code, _, records = run_quietly(pipeline, tmp_path / "runs", "--no-bench")
    assert code == EXIT_OK
    info = records["prune"]["artifact"]["info"]
    assert info["intermediate_size"] == [128, 64] and info["num_attention_heads"] == [4, 2]  # [before, after]
    config = json.loads((tmp_path / "runs" / "prune-qwen3" / "prune" / "config.json").read_text())
    assert (config["model_type"], config["head_dim"], config["num_attention_heads"]) == ("qwen3", 24, 2)
    assert 1 < records["prune"]["evaluation"]["metrics"]["ppl"] < 1e6  # the saved folder reloads and evaluates


def test_prune_stage_refuses_heads_a_gemma3_config_cannot_save(tmp_path, capsys) -> None:
    from compress.cli import EXIT_CONFIG, main

    pipeline = _pipeline(tmp_path, "gemma3", "{mlp_ratio: 0.5, heads_ratio: 0.25}", num_key_value_heads=1)
    code = main(["run", str(pipeline), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--no-bench"])
    assert code == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "prune.heads_ratio = 0.25" in err and "0.50 (2 heads)" in err, err
    assert not (tmp_path / "runs" / "prune-gemma3" / "prune").exists()


@pytest.mark.parametrize(
    ("prune", "key", "message"),
    [
        ("{mlp_ratio: 0.3}", "prune.mlp_ratio", "applies to causal-lm models; vision takes"),
        ("{head_unit: kv_group}", "prune.head_unit", "applies to causal-lm models"),
        ("{importance: wanda}", "prune.importance", "does not fit vision models; allowed: l1, l2, bn_scale, taylor"),
    ],
)
def test_a_vision_prune_stage_is_checked_against_its_familys_prune_support(
    tmp_path, fashion_mnist, prune: str, key: str, message: str
) -> None:
    from toys import pipeline_yaml

    from compress.config import load_pipeline
    from compress.errors import ConfigError

    pipeline = pipeline_yaml(tmp_path, fashion_mnist, stages=f"\n  - prune: {prune}")
    with pytest.raises(ConfigError) as err:
        load_pipeline(pipeline)
    assert f"stages[0].{key}" in str(err.value) and message in str(err.value), str(err.value)
