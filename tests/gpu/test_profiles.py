"""Optimisation profiles from ONNX inputs with symbolic dimensions (pure, CPU)."""

from __future__ import annotations

import onnx
import pytest

from compress.errors import ConfigError
from compress.gpu.profiles import Profile, ShapeRange, derive_profile, derive_profiles

from .conftest import conv_model, decoder_inputs_model


def test_vision_batch_profile():
    p = derive_profile(conv_model(), {"batch": (1, 8, 32)})
    assert p == Profile((ShapeRange("x", (1, 3, 8, 8), (8, 3, 8, 8), (32, 3, 8, 8)),))


def test_decoder_batch_and_sequence_shared_by_inputs(tmp_path):
    path = tmp_path / "lm.onnx"
    onnx.save(decoder_inputs_model(), str(path))
    p = derive_profile(path, {"batch": (1, 8, 32), "sequence": (1, 128, 2048)})
    shapes = p.as_dict()
    assert list(shapes) == ["input_ids", "attention_mask"]  # the initializers are not inputs
    for name in shapes:
        assert shapes[name].min == (1, 1) and shapes[name].opt == (8, 128) and shapes[name].max == (32, 2048)
    assert p.trtexec_args()[2] == "--maxShapes=input_ids:32x2048,attention_mask:32x2048"
    assert p.ort_tensorrt_options()["trt_profile_opt_shapes"] == "input_ids:8x128,attention_mask:8x128"


def test_missing_range_names_input_and_dim():
    with pytest.raises(ConfigError) as info:
        derive_profile(decoder_inputs_model(), {"batch": (1, 1, 4)})
    msg = str(info.value)
    assert "input 'input_ids'" in msg and "dimension 1" in msg and "'sequence'" in msg


def test_unnamed_dynamic_dim_by_axis_key():
    model = conv_model()
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")  # dynamic and unnamed
    with pytest.raises(ConfigError, match=r"x\[0\]"):
        derive_profile(model, {})
    p = derive_profile(model, {"x[0]": (2, 2, 4)})
    assert p.inputs[0].max == (4, 3, 8, 8)


def test_unused_range_is_an_error():
    with pytest.raises(ConfigError, match="seq") as info:
        derive_profile(conv_model(), {"batch": (1, 2, 4), "seq": (1, 2, 3)})
    assert "x[batch, 3, 8, 8]" in str(info.value)


@pytest.mark.parametrize("bad", [(4, 2, 8), (0, 1, 2), (1, 2), (1.0, 2, 3), (True, 2, 3), "1,2,3"])
def test_bad_ranges(bad):
    with pytest.raises(ConfigError, match="batch"):
        derive_profile(conv_model(), {"batch": bad})


def test_static_model_needs_no_ranges_and_several_profiles():
    assert derive_profile(conv_model(batch=2), {}).inputs[0].opt == (2, 3, 8, 8)
    ps = derive_profiles(conv_model(), [{"batch": (1, 1, 1)}, {"batch": (2, 16, 64)}])
    assert [p.inputs[0].opt[0] for p in ps] == [1, 16]
    with pytest.raises(ConfigError):
        derive_profiles(conv_model(), [])
