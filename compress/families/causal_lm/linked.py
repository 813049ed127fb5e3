"""A linked source (`model: {source: "hf:FOLDER", link: true}`, or `"gguf:FILE"`): the source artifact names the
folder's shards instead of holding a float32 copy of the model.

```yaml
model: {family: causal-lm, source: "hf:/data/llama-3.1-8b", link: true}
stages:
  - quantize: {precision: int4, method: rtn, group_size: 128, lm_head: int4, target: onnxruntime-genai,
               streamed: true}
```

Why: the source stage otherwise loads the model and saves it as the torch artifact, which a model larger than
memory (an 8B decoder is 32 GB in float32 on this 24 GB machine) cannot do. Linked, the source stage reads only
the config and the tokenizer, copies them into the artifact, and writes `linked.json`: the folder and the size
and sha256 of each of its files (safetensors shards, their index, config and tokenizer files). That file is
one of the artifact's model files, so the shards' digests join the content digest children chain on. A stage
that reads the shards (streamed quantize, `Adapter.weights_folder`) verifies them first and refuses a changed
or missing file by name. Stages that need the float model in memory are refused at validate
(`compress.config`), and the float baseline is not evaluated (its record says why).

A `gguf:FILE` source is converted once to a sharded float32 safetensors folder in the cache, one tensor in
memory at a time (`model_io.convert_gguf`, verified against its sidecar of sha256s before reuse), and that
folder is linked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import StageError
from compress.hashing import cached_sha256

LINK_FILE = "linked.json"
LINK_VERSION = 1
#: what the linked folder contributes: weights, their index, config and tokenizer files (as the source's
#: fingerprint, `compress.sources.source_fingerprint`, reads a folder)
LINKED_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".tiktoken")
NOT_MATERIALISED = (
    "linked source (model.link: true): the float model is not materialised, so it is not evaluated or benchmarked"
)
_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class LinkedSource:
    """The files of a linked Hugging Face folder: {name: {"size": bytes, "sha256": hex}}."""

    folder: Path
    files: dict[str, dict[str, Any]]

    @classmethod
    def record(cls, folder: Path, cache_dir: Path | None = None) -> LinkedSource:
        """Hash the folder's files (digests remembered under `cache_dir`, `hashing.cached_sha256`)."""
        folder = folder.expanduser().resolve()
        names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in LINKED_SUFFIXES)
        if not any(n.endswith(".safetensors") for n in names):
            raise StageError(f"model.link: {folder} holds no *.safetensors file; link reads safetensors shards")
        files = {
            n: {"size": (folder / n).stat().st_size, "sha256": cached_sha256(folder / n, cache_dir)} for n in names
        }
        return cls(folder, files)

    @property
    def total_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())

    @property
    def precision(self) -> str:
        """The stored dtype of the weights, from config.json (bf16, fp16, fp32; fp32 when it says none)."""
        try:
            config = json.loads((self.folder / "config.json").read_text())
        except (OSError, ValueError):
            return "fp32"
        return _DTYPES.get(str(config.get("torch_dtype") or config.get("dtype")), "fp32")

    def write(self, artifact_folder: Path) -> str:
        """Write `linked.json` into `artifact_folder`; return its name (the artifact's main file)."""
        body = {"version": LINK_VERSION, "folder": str(self.folder), "files": self.files}
        (artifact_folder / LINK_FILE).write_text(json.dumps(body, indent=1, sort_keys=True))
        return LINK_FILE

    @classmethod
    def read(cls, artifact_folder: Path) -> LinkedSource | None:
        """The link an artifact folder records, or None when the artifact holds its own weights."""
        path = artifact_folder / LINK_FILE
        if not path.is_file():
            return None
        try:
            body = json.loads(path.read_text())
            return cls(Path(body["folder"]), {str(k): dict(v) for k, v in body["files"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StageError(f"{path}: unreadable link record ({exc}); rerun with --force source") from None

    def verify(self, cache_dir: Path | None = None) -> Path:
        """The linked folder, once every recorded file is there with its recorded size and sha256."""
        for name, want in sorted(self.files.items()):
            path = self.folder / name
            redo = "restore it, or rerun with --force source to link the folder as it is now"
            if not path.is_file():
                raise StageError(f"linked source: {path} is missing ({redo})")
            if (size := path.stat().st_size) != int(want["size"]):
                raise StageError(f"linked source: {path} has changed: {size} bytes, {want['size']} recorded ({redo})")
            if (digest := cached_sha256(path, cache_dir)) != want["sha256"]:
                raise StageError(
                    f"linked source: {path} has changed: sha256 {digest[:12]}..., {want['sha256'][:12]}... "
                    f"recorded ({redo})"
                )
        return self.folder


def link_problem(scheme: str, rest: str) -> str | None:
    """Why `model.link: true` cannot take this source (its scheme after `pkg:` is resolved); None if it can.

    A GGUF file can: it is converted once, shard by shard, to a verified folder in the cache (`linked_folder`).
    """
    if scheme == "gguf":
        return None
    if scheme == "python":
        return "a python: factory builds the model in memory; link takes hf:FOLDER (a folder of safetensors shards)"
    folder = Path(rest).expanduser()
    if not folder.is_dir():
        return (
            f"'{rest}' is not a local folder (a hub id would be downloaded and loaded whole); link takes "
            "hf:FOLDER, a local folder of safetensors shards"
        )
    if not any(folder.glob("*.safetensors")):
        return f"{folder} holds no *.safetensors file; link reads safetensors shards"
    return None


def linked_folder(source: str, cache_dir: Path) -> Path:
    """The folder a linked source reads: `hf:FOLDER` itself, or a `gguf:FILE`'s conversion under `cache_dir`.

    The conversion (`model_io.convert_gguf`) is made once, one tensor in memory at a time, and verified against
    its sidecar of sha256s before every reuse.
    """
    from compress.families.causal_lm.model_io import convert_gguf
    from compress.sources import local_target, parse_source

    scheme, rest = local_target(*parse_source(source))
    if scheme == "gguf":
        return convert_gguf(Path(rest).expanduser(), cache_dir=cache_dir)
    return Path(rest).expanduser()


def load_tokenizer(folder: Path, source: str, *, trust_remote_code: bool) -> Any:
    """The tokenizer of a linked source's folder (`linked_folder`), without its weights."""
    from transformers import AutoTokenizer

    from compress.errors import ConfigError
    from compress.families.causal_lm.model_io import TOKENIZER_FILES

    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(
            f"model.source = {source}: no tokenizer in {folder} (one of {', '.join(TOKENIZER_FILES)}); the "
            "evaluation and calibration windows are tokenized with it"
        )
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


def link_folder(folder: Path, tokenizer: Any, out: Path, cache_dir: Path | None = None) -> LinkedSource:
    """The linked source artifact in `out`: config.json copied, the tokenizer saved, `linked.json` written."""
    import shutil

    linked = LinkedSource.record(folder, cache_dir)
    shutil.copy2(linked.folder / "config.json", out / "config.json")
    tokenizer.save_pretrained(out)
    linked.write(out)
    return linked
