"""Shared tiny models and data for the INT4 tests (random weights, seeded, seconds to build)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

TINY_LLAMA = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=1000,
)


def make_tiny_llama(seed: int = 0, **overrides: int) -> nn.Module:
    """Random LlamaForCausalLM of the size in TINY_LLAMA (eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()


def correlated_inputs(n: int, d: int, seed: int = 0, sample_seed: int | None = None) -> torch.Tensor:
    """``(n, d)`` activations with strongly correlated channels and a few large ones, like an LLM's.

    ``seed`` fixes the distribution (mixing matrix), ``sample_seed`` the draw (held-out data).
    """
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d).unsqueeze(0)  # decaying spectrum
    if sample_seed is not None:
        g = torch.Generator().manual_seed(sample_seed)
    z = torch.randn(n, d, generator=g)
    x = z @ mix.T
    x[:, :4] *= 8.0  # outlier channels
    return x


def calib_batches(n: int = 4, seq: int = 32, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY_LLAMA["vocab_size"], (2, seq), generator=g) for _ in range(n)]


class LogitsOnly(nn.Module):
    """Wrap a causal LM so the exported graph has one input (ids) and one output (logits)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


def export_llama(model: nn.Module, path: Path, opset: int = 18) -> Path:
    """Dynamo export of a tiny Llama (≈5 s)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            LogitsOnly(model),
            (torch.randint(0, TINY_LLAMA["vocab_size"], (1, 16)),),
            str(path),
            dynamo=True,
            opset_version=opset,
            verbose=False,
        )
    return path


@pytest.fixture(scope="session")
def tiny_llama_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """(float tiny Llama seed 0, its ONNX export at opset 18)."""
    model = make_tiny_llama(0)
    path = export_llama(model, tmp_path_factory.mktemp("onnx") / "tiny_llama.onnx")
    return model, path


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is faster and leaves the shared second core alone."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def tiny_cnn_pre(tmp_path_factory) -> Path:
    """tests/toys.py's tiny CNN exported (opset 17, dynamic batch) and pre-processed for static INT8."""
    from toys import tiny_cnn

    from compress.stages.quantize.int8 import pre_process

    folder = tmp_path_factory.mktemp("tiny-cnn")
    torch.onnx.export(
        tiny_cnn().eval(),
        torch.zeros(1, 3, 28, 28),
        str(folder / "model.onnx"),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    pre_process(str(folder / "model.onnx"), str(folder / "pre.onnx"))
    return folder / "pre.onnx"


@pytest.fixture
def minmax_recipe():
    """A factory: `minmax_recipe(pre, batches, cache, **keys)` is a static INT8 recipe for `pre`: min/max
    ranges from `batches` saved at `cache`, per-channel uint8 asymmetric defaults, `keys` overriding any field."""
    return _minmax_recipe


def _minmax_recipe(pre: Path, batches: list, cache: Path, **keys):  # -> QdqRecipe
    from compress.quant.calibration import QdqRecipe, compute_ranges

    ranges = compute_ranges(
        pre, lambda: iter(batches), calibrator="minmax", percentile=99.99, op_types=None, cache=cache, large=False
    )
    fields = dict(
        model=pre,
        cache=ranges,
        calibrator="minmax",
        per_channel=True,
        symmetric_activations=False,
        reduce_range=False,
        op_types=None,
        large=False,
        extra={"WeightSymmetric": True, "ActivationSymmetric": False, "QuantizeBias": True},
    )
    return QdqRecipe(**{**fields, **keys})
