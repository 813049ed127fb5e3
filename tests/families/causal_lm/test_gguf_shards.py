"""GGUF -> sharded safetensors folder one tensor at a time (`gguf_shards.write_gguf_folder`, `convert_gguf`), on
tiny Llama GGUF files written with the `gguf` package's writer: a float32 GGUF gives back the original weights
exactly (names mapped, q/k rows un-permuted) in several shards with a correct index; a quantized one gives the
bytes transformers' own whole-model load gives; the cached conversion is verified before reuse; a linked GGUF
source streams the same INT4 file as the linked folder of the same weights. The real SmolLM2 GGUF:
test_gguf_shards_slow.py."""

from __future__ import annotations

import json

import pytest
import torch
from llm_toys import tiny_gguf, tiny_llama

pytest.importorskip("gguf")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from compress.families.causal_lm import gguf_shards  # noqa: E402
from compress.families.causal_lm.gguf_shards import INDEX_FILE, write_gguf_folder  # noqa: E402
from compress.families.causal_lm.model_io import convert_gguf  # noqa: E402
from compress.hashing import sha256_file  # noqa: E402


def _tensors(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_float_gguf_gives_the_original_weights_in_several_shards(tmp_path) -> None:
    model = tiny_llama(tie=False)
    gguf = tiny_gguf(tmp_path / "tiny.gguf", model)
    out = tmp_path / "out"
    out.mkdir()
    limit = 100_000  # bytes: the embedding and the head (256 kB each) go alone, layers' tensors pack up to it
    index = write_gguf_folder(gguf, out, max_shard_bytes=limit)

    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n >= 4 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary shard left
    assert json.loads((out / INDEX_FILE).read_text()) == index
    state = model.state_dict()
    assert set(index["weight_map"]) == set(state)  # untied: the head is its own GGUF tensor (output.weight)
    for file in files:  # every shard holds exactly what the index says, and stays under the bound
        with safe_open(str(out / file), framework="pt") as fh:
            keys = set(fh.keys())
        assert keys == {k for k, f in index["weight_map"].items() if f == file}
        nbytes = sum(state[k].numel() * 4 for k in keys)
        assert nbytes <= limit or len(keys) == 1, (file, nbytes, keys)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    got = _tensors(out)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], state[k]) for k in state)  # exact

    config = json.loads((out / "config.json").read_text())
    want = model.config.to_dict()
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "tie_word_embeddings",
    ):
        assert config[key] == want[key], key
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 300, 2]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert AutoTokenizer.from_pretrained(out)("a t")["input_ids"]  # the GGUF's vocabulary, saved beside


def test_quantized_gguf_matches_transformers_whole_model_load(tmp_path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    gguf = tiny_gguf(tmp_path / "tiny.gguf", tiny_llama(tie=True), quantized=True)  # Q4_1 Linears, Q8_0 embedding
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf.name, dtype=torch.float32).state_dict()
    monkeypatch.setattr(gguf_shards, "_CHUNK_BYTES", 1000)  # dequantised a few rows at a time: same values
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        out = tmp_path / dtype
        out.mkdir()
        write_gguf_folder(gguf, out, dtype=dtype, max_shard_bytes=50_000)
        got = _tensors(out)
        assert set(got) == set(ref) - {"lm_head.weight"}  # tied: the head is the embedding, as save_pretrained
        for k, t in got.items():
            assert t.dtype == torch_dtype and torch.equal(t, ref[k].to(torch_dtype)), k
        assert json.loads((out / "config.json").read_text())["dtype"] == dtype


def test_convert_gguf_reuses_a_verified_folder_and_converts_a_damaged_one_again(tmp_path, monkeypatch) -> None:
    gguf = tiny_gguf(tmp_path / "tiny.gguf", tiny_llama(tie=True))
    cache = tmp_path / "cache"
    folder = convert_gguf(gguf, cache_dir=cache)
    assert folder.parent == cache / "gguf" and not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    record = json.loads((folder / "compress_source.json").read_text())
    shard = folder / "model-00001-of-00001.safetensors"
    assert record["files"][shard.name]["sha256"] == sha256_file(shard)
    assert set(record["files"]) == {p.name for p in folder.iterdir()} - {"compress_source.json"}

    calls = []
    real = gguf_shards.write_gguf_folder
    monkeypatch.setattr(gguf_shards, "write_gguf_folder", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert convert_gguf(gguf, cache_dir=cache) == folder and calls == []  # verified, reused
    good = shard.read_bytes()
    with shard.open("r+b") as fh:  # same size, other bytes
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    assert convert_gguf(gguf, cache_dir=cache) == folder and len(calls) == 1  # refused, converted again
    assert shard.read_bytes() == good
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no stale or temporary folder


def test_linked_gguf_source_streams_the_same_int4_file_as_the_linked_folder(tmp_path) -> None:
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'compress[llm]')")
    from llm_toys import tiny_pipeline
    from transformers import AutoModelForCausalLM

    from compress.cli import EXIT_OK, main
    from compress.families.causal_lm.linked import LINK_FILE

    data = '{window: 64, evaluation_windows: 2, calibration_windows: 2, generation_tokens: 4, prompts: ["def"]}'
    stage = (
        "\n  - quantize: {precision: int4, method: rtn, group_size: 32, lm_head: int4, target: onnxruntime-genai, "
        "streamed: true, name: int4}"
    )
    folder_pipeline = tiny_pipeline(tmp_path, "folder", stage, data=data, sharpen=4.0, link=True)
    gguf = tiny_gguf(tmp_path / "tiny.gguf", AutoModelForCausalLM.from_pretrained(tmp_path / "model"))
    gguf_pipeline = tmp_path / "gguf.yaml"
    gguf_pipeline.write_text(
        folder_pipeline.read_text().replace(f"hf:{tmp_path / 'model'}", f"gguf:{gguf}").replace("folder", "gguf")
    )
    runs = tmp_path / "runs"
    for pipeline in (folder_pipeline, gguf_pipeline):
        assert main(["run", str(pipeline), "--runs-dir", str(runs), "--quiet", "--no-bench"]) == EXIT_OK
    record = json.loads((runs / "gguf" / "source" / LINK_FILE).read_text())
    linked = record["folder"]
    assert "/gguf/tiny-" in linked and "model-00001-of-00001.safetensors" in record["files"]
    assert not list((runs / "gguf" / "source").glob("*.safetensors"))  # linked, not copied
    a, b = (runs / name / "int4" / "model.onnx.data" for name in ("folder", "gguf"))
    assert sha256_file(a) == sha256_file(b)  # the same weights, the same 4-bit file


def test_conversions_it_cannot_do_one_tensor_at_a_time_are_refused_by_name(tmp_path, monkeypatch) -> None:
    import transformers.integrations.gguf as hf_gguf
    from transformers import modeling_gguf_pytorch_utils as legacy

    from compress.errors import ConfigError

    gguf = tiny_gguf(tmp_path / "tiny.gguf", tiny_llama(tie=False))
    out = tmp_path / "out"
    out.mkdir()
    with monkeypatch.context() as m:  # an architecture transformers loads through its newer GGUF path
        m.setattr(hf_gguf, "GGUF_ARCHS", {"llama": None})
        with pytest.raises(ConfigError, match="architecture 'llama' goes through transformers' newer GGUF loader"):
            write_gguf_folder(gguf, out)
    # GPT-2's processor stores the head itself, as the MoE processors store merged experts
    monkeypatch.setitem(legacy.TENSOR_PROCESSORS, "llama", legacy.GPT2TensorProcessor)
    with pytest.raises(ConfigError, match=r"GPT2TensorProcessor assembles tensors .*\(output.weight\)"):
        write_gguf_folder(gguf, out)
