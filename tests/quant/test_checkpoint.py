"""GPTQ checkpoint folders: bit-exact write/read, config parsing, optional cross-check with GPTQModel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.quant.algorithms.checkpoint import read_gptq_checkpoint, write_gptq_checkpoint
from compress.quant.algorithms.gptq import GPTQConfig, gptq_quantize_model
from compress.quant.primitives.packing import pack_gptq

from .conftest import calib_batches, make_tiny_llama


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_checkpoint_round_trip_bit_exact(tmp_path: Path, fmt: str) -> None:
    model = make_tiny_llama(0)
    cfg = GPTQConfig(group_size=32, symmetric=True, act_order=True, static_groups=False)
    qws = gptq_quantize_model(model, calib_batches(2), config=cfg)
    write_gptq_checkpoint(
        tmp_path, qws, checkpoint_format=fmt, other_tensors={"model.norm.weight": model.model.norm.weight}
    )
    conf = json.loads((tmp_path / "quantize_config.json").read_text())
    assert conf == {
        "bits": 4,
        "group_size": 32,
        "desc_act": True,
        "sym": True,
        "checkpoint_format": fmt,
        "quant_method": "gptq",
    }
    back, parsed = read_gptq_checkpoint(tmp_path)
    assert parsed.checkpoint_format == fmt and set(back) == set(qws)
    for name, qw in qws.items():
        b = back[name]
        assert torch.equal(b.qweight, qw.qweight) and torch.equal(b.zeros, qw.zeros)
        assert torch.equal(b.scales, qw.scales.half().float())  # the format stores fp16 scales
        assert torch.equal(b.group_index(), qw.group_index())
        # writing what was read gives the same bytes
        assert all(
            np.array_equal(x, y)
            for x, y in zip(pack_gptq(b, fmt).__dict__.values(), pack_gptq(qw, fmt).__dict__.values(), strict=True)
        )


def test_config_json_fallback_and_refusals(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {"bits": 4, "group_size": 64, "quant_method": "awq"}})
    )
    with pytest.raises(ValueError, match="quant_method"):
        read_gptq_checkpoint(tmp_path)
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "checkpoint_format": "marlin"}))
    with pytest.raises(ValueError, match="marlin"):
        read_gptq_checkpoint(tmp_path)


def test_gptqmodel_reads_our_checkpoint(tmp_path: Path) -> None:
    """Cross-check against GPTQModel's own unpacking when it is importable (it is not in our venv)."""
    gptqmodel = pytest.importorskip(
        "gptqmodel", reason="gptqmodel is not installed (it pins numpy 2.2.6; not part of the venv)"
    )
    from gptqmodel.nn_modules.qlinear.torch import TorchQuantLinear  # pragma: no cover

    qws = gptq_quantize_model(make_tiny_llama(0), calib_batches(2), config=GPTQConfig(group_size=32))
    name, qw = next(iter(qws.items()))
    t = pack_gptq(qw, "gptq_v2")
    layer = TorchQuantLinear(
        bits=4,
        group_size=32,
        desc_act=False,
        sym=False,
        in_features=qw.shape[1],
        out_features=qw.shape[0],
        bias=False,
    )
    layer.qweight.copy_(torch.from_numpy(t.qweight))
    layer.qzeros.copy_(torch.from_numpy(t.qzeros))
    layer.scales.copy_(torch.from_numpy(t.scales))
    layer.g_idx.copy_(torch.from_numpy(t.g_idx))
    assert gptqmodel is not None
    x = torch.randn(3, qw.shape[1])
    torch.testing.assert_close(layer(x), x @ qw.dequantize().half().float().T, atol=1e-2, rtol=1e-2)
