"""Layer-streamed INT4 RTN and GPTQ (compress/quant/streamed.py) against the in-memory path, on the tiny
random Llama saved as a Hugging Face folder: same codes, zero points and (fp16, the format's type) scales;
byte-identical ONNX initializers and identical logits, hence identical perplexity; GPTQ codes identical too;
a killed run resumes from the last finished layer (GPTQ: from its kept outputs) and refuses a damaged file.
Random weights: no quality figure is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from llm_toys import VOCAB, genai_logits, tiny_llama, tiny_tokenizer
from onnx import numpy_helper

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'compress[llm]')")

from compress.genai.build import build_fused_decoder  # noqa: E402
from compress.quant import streamed  # noqa: E402
from compress.quant.algorithms.gptq import GPTQConfig, gptq_quantize_model  # noqa: E402
from compress.quant.algorithms.rtn import rtn_quantize, rtn_quantize_model  # noqa: E402
from compress.quant.primitives.weight import WeightQuantConfig  # noqa: E402
from compress.quant.streamed import (  # noqa: E402
    _gptq_tensors,
    build_streamed_decoder,
    gptq_head_tensors,
    read_quantized,
    stream_quantize,
)

CFG = WeightQuantConfig(group_size=32)  # hidden 64, intermediate 128: whole groups everywhere
IDS = np.random.default_rng(0).integers(3, VOCAB, size=(1, 33)).astype(np.int64)


def _save(folder: Path, tie: bool, shards: bool) -> Path:
    model = tiny_llama(tie=tie)
    # a small max_shard_size splits the checkpoint into several files + model.safetensors.index.json
    model.save_pretrained(folder, max_shard_size="100KB" if shards else "10GB")
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("stream") / "hf-tied", tie=True, shards=True)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("stream") / "hf-untied", tie=False, shards=False)


def _in_memory(folder: Path, lm_head: str) -> dict:
    """The in-memory RTN of the int4 stage: every decoder Linear, and the head by RTN when asked."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    qws = rtn_quantize_model(model, config=CFG)
    if lm_head == "int4":
        qws["lm_head"] = rtn_quantize(model.get_output_embeddings().weight, CFG)
    return qws


@pytest.mark.parametrize("which,lm_head", [("tied", "int4"), ("untied", "float"), ("untied", "int4")])
def test_streamed_rtn_is_bit_exact(which, lm_head, request, tmp_path) -> None:
    folder = request.getfixturevalue(which)
    assert (folder / "model.safetensors.index.json").exists() == (which == "tied")  # both source layouts
    ours = dict(read_quantized(stream_quantize(folder, tmp_path / "q", CFG, lm_head=lm_head).folder))
    ref = _in_memory(folder, lm_head)
    assert sorted(ours) == sorted(ref)
    for name, qw in ref.items():
        got = ours[name]
        assert torch.equal(got.qweight, qw.qweight), name
        assert torch.equal(got.zeros, qw.zeros), name
        # GPTQ checkpoints store fp16 scales (the builder reads them so on both paths): exact after that rounding
        assert torch.equal(got.scales, qw.scales.half().float()), name


def _ppl(logits: np.ndarray) -> float:
    """Perplexity of IDS[1:] under the logits (log-softmax in float64)."""
    lg = torch.from_numpy(logits[0, :-1]).double()
    nll = torch.nn.functional.cross_entropy(lg, torch.from_numpy(IDS[0, 1:]))
    return float(torch.exp(nll))


def test_streamed_onnx_equals_in_memory_onnx(tied, tmp_path) -> None:
    """The whole genai graph built from the streamed folder == the one built from in-memory weights."""
    streamed_dir = build_streamed_decoder(
        stream_quantize(tied, tmp_path / "q", CFG, lm_head="int4").folder, tmp_path / "streamed", lm_head="int4"
    )
    memory_dir = build_fused_decoder(
        tied, tmp_path / "memory", precision="int4", quantized=_in_memory(tied, "int4"), block_size=32, symmetric=False
    )
    a, b = (onnx.load(str(d / "model.onnx")) for d in (streamed_dir, memory_dir))
    inits_a = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    inits_b = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert inits_a.keys() == inits_b.keys()
    for name in inits_a:
        assert inits_a[name].dtype == inits_b[name].dtype and np.array_equal(inits_a[name], inits_b[name]), name
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    la, lb = genai_logits(streamed_dir, IDS), genai_logits(memory_dir, IDS)
    assert np.array_equal(la, lb)  # same graph, same weights, same kernels: identical, no tolerance needed
    assert _ppl(la) == _ppl(lb)


def test_head_in_row_blocks_equals_whole_matrix() -> None:
    w = torch.randn(104, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    whole = _gptq_tensors("lm_head", rtn_quantize(w, CFG))
    blocks = gptq_head_tensors("lm_head", w, CFG, rows=24)  # 24 does not divide 104: a short last block
    assert whole.keys() == blocks.keys()
    for name in whole:
        assert torch.equal(whole[name], blocks[name]), name


def test_killed_run_resumes_from_last_finished_layer(tied, tmp_path, monkeypatch) -> None:
    calls: list[str] = []
    real = streamed._quantize_layer

    def killed_at_layer_1(ckpt, linears, prefix, cfg):
        if prefix.endswith(".1."):
            raise KeyboardInterrupt  # what a kill looks like from inside the loop
        calls.append(prefix)
        return real(ckpt, linears, prefix, cfg)

    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        stream_quantize(tied, out, CFG, quantize_layer=killed_at_layer_1)
    assert calls == ["model.layers.0."] and (out / "layer-00000.json").exists()
    assert not (out / "layer-00001.safetensors").exists() and not list(out.glob(".*tmp*"))

    calls.clear()
    counting = lambda *a: calls.append(a[2]) or real(*a)  # noqa: E731
    result = stream_quantize(tied, out, CFG, quantize_layer=counting)
    assert calls == ["model.layers.1."]  # layer 0 verified and reused
    assert [t.reused for t in result.layers] == [True, False]
    fresh = dict(read_quantized(stream_quantize(tied, tmp_path / "fresh", CFG).folder))
    resumed = dict(read_quantized(out))
    assert all(torch.equal(resumed[n].qweight, fresh[n].qweight) for n in fresh)

    # a layer file whose bytes changed is not trusted: it is quantized again
    path = out / "layer-00000.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    calls.clear()
    stream_quantize(tied, out, CFG, quantize_layer=counting)
    assert calls == ["model.layers.0."]
    # another quantization setting is another key: every layer is redone
    calls.clear()
    stream_quantize(tied, out, WeightQuantConfig(group_size=16), quantize_layer=counting)
    assert calls == ["model.layers.0.", "model.layers.1."]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 16


def _calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB, (1, 32), generator=g) for _ in range(4)]  # 4 windows of 32 tokens


GPTQ_CFG = GPTQConfig(group_size=32)


def test_streamed_gptq_equals_in_memory_gptq(tied, tmp_path) -> None:
    """Same layer inputs (layer 0's from the embeddings, later ones from the quantized layers), same Hessian hooks
    and sequential groups: the codes come out identical, not merely close (scales: fp16, the format's type)."""
    from transformers import AutoModelForCausalLM

    ours = dict(read_quantized(stream_quantize(tied, tmp_path / "q", GPTQ_CFG, calibration=_calibration()).folder))
    model = AutoModelForCausalLM.from_pretrained(tied, dtype=torch.float32).eval()
    ref = gptq_quantize_model(model, _calibration(), config=GPTQ_CFG)
    assert sorted(ours) == sorted(ref)
    for name, qw in ref.items():
        assert torch.equal(ours[name].qweight, qw.qweight) and torch.equal(ours[name].zeros, qw.zeros), name
        assert torch.equal(ours[name].scales, qw.scales.half().float()), name
    assert not (tmp_path / "q" / "hidden.activations").exists()  # the resume state goes once all layers are done


def test_killed_gptq_run_resumes_from_kept_activations(tied, tmp_path, monkeypatch) -> None:
    real, done = streamed._calibrated_layer, []

    def killed_at_layer_1(ckpt, layer, prefix, *rest):
        if prefix.endswith(".1."):
            raise KeyboardInterrupt
        done.append(prefix)
        return real(ckpt, layer, prefix, *rest)

    out = tmp_path / "q"
    monkeypatch.setattr(streamed, "_calibrated_layer", killed_at_layer_1)
    with pytest.raises(KeyboardInterrupt):
        stream_quantize(tied, out, GPTQ_CFG, calibration=_calibration())
    assert done == ["model.layers.0."] and (out / "hidden.activations").exists()

    done.clear()
    monkeypatch.setattr(streamed, "_calibrated_layer", lambda *a: done.append(a[2]) or real(*a))
    result = stream_quantize(tied, out, GPTQ_CFG, calibration=_calibration())
    assert done == ["model.layers.1."] and [t.reused for t in result.layers] == [True, False]
    fresh = dict(read_quantized(stream_quantize(tied, tmp_path / "fresh", GPTQ_CFG, calibration=_calibration()).folder))
    resumed = dict(read_quantized(out))
    assert all(torch.equal(resumed[n].qweight, fresh[n].qweight) for n in fresh)  # layer 1 saw the same inputs

    # other calibration data is another key: nothing is reused
    done.clear()
    stream_quantize(tied, out, GPTQ_CFG, calibration=_calibration()[:2])
    assert done == ["model.layers.0.", "model.layers.1."]


def test_finished_gptq_run_is_reused_without_kept_activations(tied, tmp_path, monkeypatch) -> None:
    """A run killed after its last layer (e.g. in the ONNX writer) has no kept outputs left: every layer is
    verified and reused, none redone, nothing captured."""
    out = tmp_path / "q"
    first = dict(read_quantized(stream_quantize(tied, out, GPTQ_CFG, calibration=_calibration()).folder))
    assert not (out / "hidden.activations").exists()
    done = []
    monkeypatch.setattr(streamed, "_calibrated_layer", lambda *a: done.append(a[2]))
    monkeypatch.setattr(streamed, "capture_layer0", lambda *a: done.append("capture"))
    result = stream_quantize(tied, out, GPTQ_CFG, calibration=_calibration())
    assert done == [] and all(t.reused for t in result.layers)
    again = dict(read_quantized(out))
    assert all(torch.equal(again[n].qweight, first[n].qweight) for n in first)
