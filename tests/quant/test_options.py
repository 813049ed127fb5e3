"""Quantize options: scheme keys at the top, each algorithm's and target's keys under `method:` / `target:`."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from compress.config import load_pipeline
from compress.errors import ConfigError
from compress.quant import algorithms, targets, vocab
from compress.stages.quantize.int4 import Int4Options
from compress.stages.quantize.int8 import Int8Options

REPO = Path(__file__).resolve().parents[2]
PIPELINE = """name: t
model: {family: vision, source: "python:toys:tiny_cnn", num_classes: 10, input_size: 28}
data:
  dataset: %s
  train: {split: train, samples: 100}
  calibration: {split: train, samples: 10}
  evaluation: {split: test, samples: 10}
stages:
  - finetune: {steps: 1}
  - export: {}
  - quantize: QUANTIZE
gates: {top1_drop_max: 1.0}
""" % (REPO / "calibration" / "fashion-mnist.yaml")


def _error(tmp_path: Path, quantize: str) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.replace("QUANTIZE", quantize))
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    return str(info.value)


@pytest.mark.parametrize(
    ("cls", "short", "mapping"),
    [
        (Int4Options, {"precision": "int4", "method": "gptq"}, {"precision": "int4", "method": {"name": "gptq"}}),
        (
            Int4Options,
            {"precision": "int4", "target": "tensorrt"},
            {"precision": "int4", "target": {"name": "tensorrt"}},
        ),
        (Int8Options, {"precision": "int8", "method": "static"}, {"precision": "int8", "method": {"name": "static"}}),
        (Int8Options, {"precision": "int8"}, {"precision": "int8", "method": "auto", "target": "onnxruntime-cpu"}),
    ],
)
def test_shorthand_and_mapping_give_the_same_options_and_cache_key(cls, short, mapping) -> None:
    a, b = cls.model_validate(short), cls.model_validate(mapping)
    assert a == b
    assert a.cache_fields() == b.cache_fields()


def test_an_algorithm_key_changes_the_cache_key() -> None:
    base = Int4Options(precision="int4", method="gptq").cache_fields()
    damped = Int4Options(precision="int4", method={"name": "gptq", "damp": 0.02}).cache_fields()
    assert damped != base and damped["method"]["damp"] == 0.02


def test_a_gptq_key_under_rtn_is_refused_naming_rtns_keys(tmp_path: Path) -> None:
    msg = _error(tmp_path, "{precision: int4, method: {name: rtn, damp: 0.02}, input: finetune}")
    assert "stages[2].quantize.method = {'name': 'rtn', 'damp': 0.02}: Value error" in msg
    assert "method rtn has no key 'damp' (damp is a key of method gptq); method rtn takes: name" in msg


def test_a_static_key_under_dynamic_is_refused_naming_dynamics_keys() -> None:
    with pytest.raises(ValidationError, match="method dynamic takes: name, per_channel"):
        Int8Options(precision="int8", method={"name": "dynamic", "calibrator": "entropy"})


def test_a_flat_algorithm_key_is_refused_with_its_new_place(tmp_path: Path) -> None:
    msg = _error(tmp_path, "{precision: int4, method: gptq, damp: 0.02, input: finetune}")
    assert "'damp' is a key of method gptq: write method: {name: gptq, damp: ...}" in msg
    msg = _error(tmp_path, "{precision: int8, calibrator: entropy}")
    assert "'calibrator' is a key of method static: write method: {name: static, calibrator: ...}" in msg


def test_a_target_key_is_refused_under_the_wrong_target() -> None:
    with pytest.raises(ValidationError, match="target tensorrt takes: opset, dynamo, name"):
        Int4Options(precision="int4", target={"name": "tensorrt", "accuracy_level": 0})


def test_the_group_size_rule_is_one_for_both_precisions(tmp_path: Path) -> None:
    int8 = _error(tmp_path, "{precision: int8, method: weight-only, group_size: 48}")
    int4 = _error(tmp_path, "{precision: int4, method: rtn, group_size: 48, input: finetune}")
    rule = "stages[2].quantize.group_size = 48: Value error, group_size = 48; allowed: a power of two >= 16"
    assert rule in int8 and rule in int4
    assert Int8Options(precision="int8", group_size=256).group_size == 256  # not only 32/64/128
    assert Int4Options(precision="int4", group_size=16).group_size == 16


def test_group_size_is_refused_where_the_method_has_no_groups(tmp_path: Path) -> None:
    msg = _error(tmp_path, "{precision: int8, method: static, group_size: 64}")
    assert "stages[2].quantize.group_size = 64: applies to method weight-only only (method is static)" in msg
    # auto resolves to the family's method (vision: static) before the check
    msg = _error(tmp_path, "{precision: int8, group_size: 64}")
    assert "(method is static)" in msg


def test_lm_head_is_one_key_for_both_precisions(tmp_path: Path) -> None:
    assert Int8Options(precision="int8", lm_head="float").lm_head == "float"
    assert Int8Options(precision="int8").lm_head == "int8"
    assert Int4Options(precision="int4", lm_head="int8").lm_head == "int8"
    assert Int4Options(precision="int4").lm_head == "float"
    msg = _error(tmp_path, "{precision: int8, lm_head: int4}")
    assert "stages[2].quantize.lm_head = 'int4'" in msg and "allowed: float, int8" in msg
    for old in ("include_lm_head: false", "block_size: 32"):
        assert "unknown key" in _error(tmp_path, "{precision: int8, " + old + "}")


def test_int8_refuses_a_target_key_that_does_not_apply(tmp_path: Path) -> None:
    msg = _error(tmp_path, "{precision: int8, target: {name: onnxruntime-cpu, opset: 17}}")
    assert "stages[2].quantize.target = {name: onnxruntime-cpu, opset: 17}: opset: int8 starts from an ONNX" in msg
    msg = _error(tmp_path, "{precision: int8, method: dynamic, target: tensorrt}")
    assert "method dynamic writes com.microsoft ops that tensorrt cannot build; use static" in msg


def test_registries_match_the_vocabulary() -> None:
    assert tuple(algorithms.INT4) == vocab.INT4_ALGORITHMS
    assert tuple(algorithms.INT8) == vocab.INT8_METHODS
    assert tuple(targets.TARGET_OPTIONS) == vocab.TARGETS
    for registry in (algorithms.INT4, algorithms.INT8, targets.TARGET_OPTIONS):
        for name, cls in registry.items():
            assert cls().name == name if name != "checkpoint" else cls(folder="x").name == name


def test_a_registry_entry_outside_the_vocabulary_is_refused() -> None:
    from typing import Literal

    from compress.quant.registry import NamedOptions, registry

    class Hqq(NamedOptions):
        name: Literal["hqq"] = "hqq"

    with pytest.raises(RuntimeError, match="hqq: not in compress.quant.vocab"):
        registry((Hqq,), vocab.INT4_ALGORITHMS)


@pytest.mark.parametrize("saturates", [True, False])
def test_reduce_range_auto_follows_this_cpu_and_the_target(monkeypatch, saturates: bool) -> None:
    """`auto` is 7-bit weights exactly where ONNX Runtime's u8·s8 kernels saturate, never for TensorRT (whose
    Q/DQ graphs are evaluated unfused); the resolved value is what the cache key holds."""
    import compress.stages.quantize.int8 as int8

    monkeypatch.setattr(int8, "int8_dot_saturates", lambda: saturates)
    for method in ("static", "dynamic", "smoothquant"):
        cpu = Int8Options(precision="int8", method=method)
        assert cpu.method.reduce_range is saturates
        assert cpu.cache_fields()["method"]["reduce_range"] is saturates
    trt = Int8Options(precision="int8", method="static", target="tensorrt")
    assert trt.method.reduce_range is False
    explicit = Int8Options(precision="int8", method={"name": "static", "reduce_range": False})
    assert explicit.method.reduce_range is False
    auto = Int8Options(precision="int8")  # `method: auto`: resolved with the family, so the key says this CPU's answer
    assert auto.cache_fields()["auto_reduce_range"] is saturates
    assert auto.method_for("static").reduce_range is saturates


def test_smoothquant_options_and_refusals(tmp_path: Path) -> None:
    """alpha joins the cache key; a bad alpha names its place and range; the method starts from torch, writes
    ONNX, and is refused for a family without decoder layers to fold into."""
    auto = Int8Options(precision="int8", method="smoothquant")
    half = Int8Options(precision="int8", method={"name": "smoothquant", "alpha": 0.5})
    assert auto.method.alpha == "auto" and half.method.alpha == 0.5
    assert auto.cache_fields()["method"]["alpha"] == "auto" and half.cache_fields()["method"]["alpha"] == 0.5
    assert auto.cache_fields()["smoothquant_alpha_grid"][-1] == 0.95  # a new grid is a new graph
    assert "smoothquant_alpha_grid" not in half.cache_fields()
    assert auto.accepts == frozenset({"torch"}) and auto.output_format("torch") == "onnx"
    msg = _error(tmp_path, "{precision: int8, method: {name: smoothquant, alpha: 1.5}}")
    assert "stages[2].quantize.method" in msg and "alpha = 1.5; allowed: auto or a number in [0, 1]" in msg
    msg = _error(tmp_path, "{precision: int8, method: smoothquant}")
    assert "smoothquant: not for family 'vision'; allowed: static, weight-only, dynamic" in msg


def test_bias_correction_joins_the_cache_key_only_when_on_and_goes_with_a_search(tmp_path: Path) -> None:
    from compress.families.vision.adapter import VisionAdapter

    off = Int8Options(precision="int8", method={"name": "static"}).cache_fields()
    on = Int8Options(precision="int8", method={"name": "static", "bias_correction": True}).cache_fields()
    assert "bias_correction" not in off["method"]  # graphs made before the option existed keep their key
    assert on["method"]["bias_correction"] is True and on["bias_correction_version"] >= 1
    with pytest.raises(ValidationError):
        Int8Options(precision="int8", method={"name": "static", "bias_correction": "maybe"})
    searched = Int8Options(
        precision="int8", method={"name": "static", "bias_correction": True}, accuracy_budget={"max_drop": 0.1}
    )
    assert searched.check_family(VisionAdapter) == []  # corrected first, then searched (tests/stages)
