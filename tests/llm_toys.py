"""Tiny random Llama decoders (tied and untied) and a word-level tokenizer, shared by the LLM tests."""

from __future__ import annotations

import re
from pathlib import Path

import torch

VOCAB = 1000
SPECIALS = ["<pad>", "<unk>", "<eos>"]


def tiny_llama(tie: bool, seed: int = 0, layers: int = 2, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        intermediate_size=128,
        vocab_size=VOCAB,
        tie_word_embeddings=tie,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval()


def genai_logits(folder: Path, ids, kv_heads: int = 2, head: int = 16):
    """Full-sequence logits of the fused graph `folder/model.onnx` for `ids` (1, T), from an empty cache."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((1, kv_heads, 0, head), np.float32)  # (B, kv_heads, 0, head)
    return session.run(["logits"], feed)[0]


def tiny_tokenizer():
    """A word-level fast tokenizer over the most common words of pydoc topics (offline, instant)."""
    from collections import Counter
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Counter(re.findall(r"\w+|[^\w\s]", " ".join(topics[k] for k in sorted(topics)[:20])))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word, _ in words.most_common(VOCAB - len(SPECIALS)):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def fragile_llama(outlier: float):
    """The tiny tied Llama with layer 1's o_proj fragile to quantization and the same function in float: its
    columns fed by v rows 0 and 16 (one per kv head: o_proj columns 0, 16 of heads 0, 1 and 32, 48 of heads 2, 3)
    are `outlier` times larger, those v rows `outlier` times smaller, so every group of 32 of every o_proj row
    holds two outliers and RTN loses the rest; the final norm sharpened (x8)."""
    model = tiny_llama(tie=True)
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        attn.v_proj.weight[[0, 16]] /= outlier
        attn.o_proj.weight[:, [0, 16, 32, 48]] *= outlier
        model.model.norm.weight.mul_(8.0)
    return model


def own_text(model, tmp: Path, windows: int, window: int):
    """Save `model` and the tiny tokenizer in `tmp/model`, and a text sampled from the model in `tmp/own.txt`
    (words joined by spaces, `windows` windows of `window` tokens each started afresh): on its own samples the
    float model's perplexity is the floor that other weights raise in expectation (their cross-entropy exceeds
    its entropy by the KL), where on pydoc text a random model's perplexity moves either way. Returns the
    sampled ids (windows, window) as numpy."""
    model.save_pretrained(tmp / "model")
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp / "model")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (windows, 1), generator=gen)
    with torch.no_grad():
        for _ in range(window - 1):
            logits = model(input_ids=ids).logits[:, -1].double()
            logits[:, :3] = -torch.inf  # no special tokens inside the text
            ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)], 1)
    (tmp / "own.txt").write_text(" ".join(tok.convert_ids_to_tokens(ids.flatten().tolist())))
    return ids.numpy()


def tiny_pipeline(
    tmp: Path, name: str, stages: str, *, data: str, gates: str = "{}", sharpen: float = 1.0, link: bool = False
) -> Path:
    """Save a tiny tied Llama in `tmp/model` (once) and write a pipeline `tmp/<name>.yaml` that loads it.

    `sharpen` scales the final norm: a random-init model is near-uniform, a sharper one has opinions that a
    pruned student can lose and win back. `data` and `gates` are YAML flow mappings, `stages` a block list.
    `link`: the pipeline links the folder (`model.link: true`) instead of loading it.
    """
    model_dir = tmp / "model"
    if not model_dir.exists():
        model = tiny_llama(tie=True)
        with torch.no_grad():
            model.model.norm.weight.mul_(sharpen)
        model.save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
    path = tmp / f"{name}.yaml"
    path.write_text(f"""name: {name}
model: {{family: causal-lm, source: "hf:{model_dir}"{", link: true" if link else ""}}}
data: {data}
stages:{stages}
gates: {gates}
""")
    return path


def tiny_gguf(path: Path, model, *, quantized: bool = False) -> Path:
    """Write a Llama `model` as a GGUF file the way llama.cpp's converter does (tensor names, q/k rows permuted
    for its rotary layout), with a byte-level BPE vocabulary of the model's size.

    `quantized`: the Linear weights as Q4_1 and the embedding as Q8_0 (SmolLM2's GGUF mix); else all float32.
    """
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    bytes_ = list(bytes_to_unicode().values())
    tokens = [*bytes_, "<|endoftext|>", "Ġt", *(f"<x{i}>" for i in range(cfg.vocab_size - len(bytes_) - 2))]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    writer.add_token_merges(["Ġ t"])
    writer.add_eos_token_id(len(bytes_))

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for hf_name, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        base, _, suffix = hf_name.rpartition(".")
        w = tensor.detach().float().numpy()
        if base.endswith("q_proj"):
            w = permute(w, heads)
        elif base.endswith("k_proj"):
            w = permute(w, kv)
        kind = gguf.GGMLQuantizationType.F32
        if quantized and w.ndim == 2:
            kind = gguf.GGMLQuantizationType.Q8_0 if "embed" in base else gguf.GGMLQuantizationType.Q4_1
        data = w if kind == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(w, kind)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
