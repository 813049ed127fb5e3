"""Write a random-weight decoder with the exact shape of a real model, as a Hugging Face folder.

    python scripts/make_shapes.py llama-3.2-3b /tmp/shapes/llama-3.2-3b      # 6.4 GB bf16, 28 layers
    python scripts/make_shapes.py llama-3.1-8b /tmp/shapes/llama-3.1-8b      # 16.1 GB bf16, 32 layers
    python scripts/make_shapes.py smollm2-135m /tmp/shapes/smollm2-135m      # 0.27 GB, for tests and checks

Why: memory and time of the large-model paths (layer-streamed quantization, >2 GB ONNX files) can only be
measured on files of the real size, and the real weights are not available offline. The weights are
N(0, 0.02) (norms 1), so QUALITY FIGURES ON THESE MODELS ARE MEANINGLESS: never report perplexity,
accuracy or generated text of them; only bytes, seconds and RSS.

What is written: `config.json` (the architecture's published configuration, `torch_dtype: bfloat16`),
bf16 safetensors shards `model-0000i-of-0000n.safetensors` and `model.safetensors.index.json` (the layout
`from_pretrained` reads), and `SHAPE.md` saying what this folder is. No tokenizer: none of these models'
tokenizers installs offline, so the folder has none (say so wherever its output is used).

Memory: tensors are generated and written one shard at a time (a shard holds the tensors of whole decoder
layers, at most `--shard-gb`; the embedding and head get their own), so the peak is about one shard plus
one float32 tensor, never the whole model. Each tensor's values come from its own seed (a hash of its name
and `--seed`), so the same command writes the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

#: Published configurations (config.json of the Hugging Face repos), with the keys a Llama config needs.
SHAPES: dict[str, dict] = {
    "llama-3.2-3b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    },
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    },
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    },
}
STD = 0.02  # transformers' LlamaConfig.initializer_range


def tensor_shapes(cfg: dict) -> Iterator[tuple[int | None, str, tuple[int, ...]]]:
    """(layer index or None, tensor name, shape) of every tensor of a Llama checkpoint, in file order."""
    h, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    yield None, "model.embed_tokens.weight", (cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield i, p + "input_layernorm.weight", (h,)
        yield i, p + "self_attn.q_proj.weight", (q, h)
        yield i, p + "self_attn.k_proj.weight", (kv, h)
        yield i, p + "self_attn.v_proj.weight", (kv, h)
        yield i, p + "self_attn.o_proj.weight", (h, q)
        yield i, p + "post_attention_layernorm.weight", (h,)
        yield i, p + "mlp.gate_proj.weight", (inter, h)
        yield i, p + "mlp.up_proj.weight", (inter, h)
        yield i, p + "mlp.down_proj.weight", (h, inter)
    yield None, "model.norm.weight", (h,)
    if not cfg["tie_word_embeddings"]:
        yield None, "lm_head.weight", (cfg["vocab_size"], h)


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """bf16 N(0, STD) for a matrix, ones for a norm; seeded by the name so every run writes the same bytes."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big"))
    return (torch.randn(shape, generator=gen) * STD).to(torch.bfloat16)


def plan_shards(cfg: dict, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors grouped into shards: whole decoder layers up to `shard_bytes`; embedding and head alone."""
    groups: list[tuple[str, list[tuple[str, tuple[int, ...]]]]] = []  # (kind, tensors) per layer / big tensor
    for layer, name, shape in tensor_shapes(cfg):
        if layer is None and len(shape) > 1:
            groups.append(("alone", [(name, shape)]))
        elif layer is None or groups[-1][0] == f"layer {layer}":  # the final norm joins the last layer
            groups[-1][1].append((name, shape))
        else:
            groups.append((f"layer {layer}", [(name, shape)]))
    shards: list[list[tuple[str, tuple[int, ...]]]] = []
    size = shard_bytes + 1  # the first layer opens a shard
    for kind, tensors in groups:
        nbytes = sum(2 * torch.Size(shape).numel() for _, shape in tensors)
        if kind == "alone" or size + nbytes > shard_bytes or shards[-1][0][0].endswith("embed_tokens.weight"):
            shards.append([])
            size = 0
        shards[-1].extend(tensors)
        size += nbytes
    return shards


def write_shape(shape: str, out: Path, *, seed: int = 0, shard_gb: float = 2.0, say=print) -> Path:
    """Write the folder (see the module docstring); refuses an existing non-empty `out`."""
    from safetensors.torch import save_file

    if shape not in SHAPES:
        raise SystemExit(f"shape = {shape!r}; allowed: {', '.join(SHAPES)}")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: exists and is not empty; remove it or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**SHAPES[shape], "torch_dtype": "bfloat16"}
    shards = plan_shards(cfg, int(shard_gb * 2**30))
    weight_map, total = {}, 0
    for index, tensors in enumerate(shards, 1):
        t0 = time.perf_counter()
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        data = {name: random_tensor(name, shp, seed) for name, shp in tensors}
        tmp = out / f".{file}.tmp"
        save_file(data, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / file)
        nbytes = sum(t.numel() * t.element_size() for t in data.values())
        total += nbytes
        weight_map.update({name: file for name in data})
        del data
        say(f"{file}: {len(tensors)} tensors, {nbytes / 1e9:.2f} GB, {time.perf_counter() - t0:.1f} s")
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "SHAPE.md").write_text(
        f"Random-weight model with the shape of {shape} (scripts/make_shapes.py, seed {seed}).\n"
        "Weights are N(0, 0.02), norms 1: quality figures on it are meaningless and must not be reported.\n"
        "No tokenizer: none installs offline.\n"
    )
    say(f"{out}: {shape}, {total / 1e9:.2f} GB bf16 in {len(shards)} shards")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=2.0, help="largest shard of decoder layers (GB)")
    args = parser.parse_args(argv)
    write_shape(args.shape, args.out, seed=args.seed, shard_gb=args.shard_gb)


if __name__ == "__main__":
    main()
