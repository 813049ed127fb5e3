"""`compress generate ARTIFACT PROMPT...`: text from any causal-lm artifact of a run.

The tokenizer is found by walking the artifact's parents (each `artifact.json` names its parent, a sibling
folder of the run) up to the first folder that holds tokenizer files: the source or a torch stage.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from compress.errors import ConfigError

if TYPE_CHECKING:
    from compress.artifact import Artifact
    from compress.families.causal_lm.generate import GenerationOptions
    from compress.families.causal_lm.sessions import OrtCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def find_tokenizer_folder(artifact_dir: Path) -> Path:
    folder, seen = artifact_dir, []
    while True:
        seen.append(folder.name)
        if any((folder / f).is_file() for f in TOKENIZER_FILES):
            return folder
        manifest = folder / "artifact.json"
        parent = json.loads(manifest.read_text()).get("parent") if manifest.is_file() else None
        if not parent:
            raise ConfigError(f"{artifact_dir}: no tokenizer in the artifact or its parents ({' <- '.join(seen)})")
        folder = artifact_dir.parent / parent


def _options(args: argparse.Namespace) -> GenerationOptions:
    """The sampling flags as GenerationOptions; a bad value is a one-line error naming the flag."""
    from pydantic import ValidationError

    from compress.families.causal_lm.generate import GenerationOptions

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads = {args.threads}: must be at least 1 (omit it for all cores)")
    try:
        return GenerationOptions(
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
        )
    except ValidationError as exc:
        flags = {"do_sample": "sample"}
        shown = [
            f"--{flags.get(str(e['loc'][0]), str(e['loc'][0])).replace('_', '-')} = {e['input']!r}: {e['msg']}"
            for e in exc.errors()
        ]
        raise ConfigError("; ".join(shown)) from None


def _causal_lm_artifact(folder: Path) -> Artifact:
    """The artifact in `folder`, refused unless it is a complete causal-lm torch or ONNX artifact."""
    from compress.artifact import read_artifact, verify_files

    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder (give an artifact folder of a run, e.g. runs/NAME/int8)")
    artifact = read_artifact(folder)
    if artifact is None:
        raise ConfigError(f"{folder}: not a complete artifact folder (no artifact.json or its model file)")
    if artifact.files:  # a folder written by the runner: its files are checked as a cache hit's would be
        digests = folder.parent.parent / ".cache"  # runs/.cache, beside the run folders
        problem = verify_files(artifact, digests if digests.is_dir() else None)
        if problem is not None:
            raise ConfigError(f"{folder}: damaged ({problem}); run its pipeline again to rebuild it")
    resolved = folder.parent / "pipeline.resolved.json"
    family = json.loads(resolved.read_text()).get("model", {}).get("family") if resolved.is_file() else None
    if family not in (None, "causal-lm") or (artifact.format == "torch" and artifact.file != "."):
        raise ConfigError(f"{folder}: a {family or 'vision'} artifact; generate needs one of a causal-lm run")
    if artifact.format not in ("onnx", "torch"):
        raise ConfigError(f"{folder}: cannot generate from a {artifact.format} artifact (torch or onnx only)")
    if (
        artifact.unmeasured
    ):  # e.g. a CUDA-flavoured graph: ONNX Runtime's CPU would run it, but it is not the deployment
        raise ConfigError(f"{folder}: {artifact.unmeasured}; generate runs artifacts on this machine's CPU only")
    return artifact


def _open_onnx(path: Path, threads: int) -> OrtCausalLM:
    from google.protobuf.message import DecodeError
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf

    from compress.families.causal_lm.sessions import OrtCausalLM

    try:
        return OrtCausalLM(path, threads=threads)
    except (DecodeError, Fail, InvalidGraph, InvalidProtobuf, ValueError) as exc:  # onnx.load's, ORT's, ours
        raise ConfigError(f"{path}: not a valid ONNX file ({path.stat().st_size} bytes read; {exc})") from None


def generate_command(args: argparse.Namespace) -> int:
    options = _options(args)
    artifact = _causal_lm_artifact(args.artifact)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(find_tokenizer_folder(args.artifact))
    threads = args.threads or os.cpu_count() or 1
    from compress.families.causal_lm.generate import generate
    from compress.families.causal_lm.task import encode_prompt

    prompts = [encode_prompt(tokenizer, p) for p in args.prompt]
    stops = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    options = options.model_copy(update={"stop_token_ids": stops, "pad_token_id": tokenizer.pad_token_id or 0})
    if artifact.format == "onnx":
        result = generate(_open_onnx(artifact.main, threads), prompts, options)
        tokens, speed = result.tokens, result.decode_tokens_per_second
    else:
        tokens, speed = _torch_generate(artifact.path, prompts, options, threads), None
    for prompt, new in zip(args.prompt, tokens, strict=True):
        print(prompt + tokenizer.decode(new, skip_special_tokens=True))
    rate = f", {speed:.1f} tokens/s decode" if speed else ""
    print(f"[{artifact.name}: {artifact.format} {artifact.precision}{rate}]", flush=True)
    return 0


def _torch_generate(folder: Path, prompts: list[list[int]], options, threads: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    from compress.sources import quiet_transformers

    quiet_transformers()
    torch.set_num_threads(threads)
    if options.seed is not None:
        torch.manual_seed(options.seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.inference_mode():
            y = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=options.max_new_tokens,
                do_sample=options.do_sample,
                temperature=options.temperature,
                top_k=options.top_k or None,
                top_p=options.top_p,
                repetition_penalty=options.repetition_penalty,
                eos_token_id=list(options.stop_token_ids) or None,
                pad_token_id=options.pad_token_id,
            )
        out.append(y[0, len(ids) :].tolist())
    return out
