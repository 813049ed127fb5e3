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
