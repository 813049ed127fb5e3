"""scripts/make_shapes.py: a random-weight folder with a real architecture's exact shape, in the layout
`from_pretrained` reads, written shard by shard and reproducibly. (Its weights are random: no quality here.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from toys import load_script


@pytest.fixture(scope="module")
def make_shapes():
    return load_script("make_shapes")


def test_smollm2_shape_folder(make_shapes, tmp_path) -> None:
    out = make_shapes.write_shape("smollm2-135m", tmp_path / "a", shard_gb=0.05, say=lambda _m: None)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files == sorted(p.name for p in out.glob("*.safetensors"))
    total, seen = 0, {}
    for f in files:
        with safe_open(str(out / f), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                t = fh.get_tensor(name)
                assert t.dtype == torch.bfloat16 and index["weight_map"][name] == f
                total += t.numel() * 2
                seen[name] = tuple(t.shape)
    assert total == index["metadata"]["total_size"]
    # SmolLM2-135M: 134,515,008 parameters (the real model's count), tied head, 30 layers of 9 tensors
    assert total // 2 == 134_515_008 and len(seen) == 1 + 30 * 9 + 1 and "lm_head.weight" not in seen
    assert seen["model.layers.0.self_attn.k_proj.weight"] == (192, 576)  # 3 KV heads of 64
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert "meaningless" in (out / "SHAPE.md").read_text() and not (out / "tokenizer.json").exists()

    # each tensor comes from its own seed: regenerated alone it has the stored bytes; another seed differs
    name = "model.layers.7.mlp.up_proj.weight"
    with safe_open(str(out / index["weight_map"][name]), framework="pt") as fh:
        stored = fh.get_tensor(name)
    assert torch.equal(make_shapes.random_tensor(name, seen[name], 0), stored)
    assert not torch.equal(make_shapes.random_tensor(name, seen[name], 1), stored)
    assert abs(float(stored.float().std()) - make_shapes.STD) < 1e-3  # N(0, 0.02) over 884,736 values


def test_shards_hold_whole_layers(make_shapes) -> None:
    cfg = make_shapes.SHAPES["llama-3.1-8b"]
    shards = make_shapes.plan_shards(cfg, 2 * 2**30)
    assert shards[0] == [("model.embed_tokens.weight", (128256, 4096))] and shards[-1][0][0] == "lm_head.weight"
    for shard in shards[1:-1]:
        layers = {name.split(".")[2] for name, _ in shard if name.startswith("model.layers.")}
        assert sum(name.endswith("q_proj.weight") for name, _ in shard) == len(layers)  # no layer split
        assert sum(2 * torch.Size(s).numel() for _, s in shard) <= 2 * 2**30
    n = sum(torch.Size(s).numel() for shard in shards for _, s in shard)
    assert n == 8_030_261_248  # Llama-3.1-8B's parameter count


def test_existing_folder_is_refused(make_shapes, tmp_path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="exists and is not empty"):
        make_shapes.write_shape("smollm2-135m", tmp_path / "x")
