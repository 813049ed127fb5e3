"""`compress generate ARTIFACT PROMPT... [--preset NAME] [--temperature ...]`: text from any causal-lm
artifact of a run, streamed as the tokens come.

Decoding = a preset (`compress.families.causal_lm.presets`) with every explicit flag overriding its key.
Engines: onnxruntime-genai's Generator for a genai folder (the deployable runtime), our `generate` over the
ONNX session for our exports and over the torch session for torch folders (the same engine as ONNX, so a
torch and an ONNX artifact decode alike).

The tokenizer is found by walking the artifact's parents (each `artifact.json` names its parent, a sibling
folder of the run) up to the first folder that holds tokenizer files: the source or a torch stage.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.errors import ConfigError

if TYPE_CHECKING:
    from compress.artifact import Artifact
    from compress.families.causal_lm.generate import GenerationOptions
    from compress.families.causal_lm.sessions import OrtCausalLM, TorchCausalLM

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


#: flag -> GenerationOptions key of every decoding flag that overrides a preset's value
OVERRIDES = {
    "sample": "do_sample",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "num_beams": "num_beams",
    "length_penalty": "length_penalty",
    "repetition_penalty": "repetition_penalty",
    "no_repeat_ngram_size": "no_repeat_ngram_size",
}


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `compress generate`; decoding flags default to None = "the preset's value"."""
    parser.add_argument("artifact", type=Path, nargs="?", help="artifact folder (holds artifact.json)")
    parser.add_argument("prompt", nargs="*", help="one or more prompts (each generated and streamed in turn)")
    parser.add_argument("--preset", default="greedy", help="decoding preset (see --list-presets); default greedy")
    parser.add_argument("--list-presets", action="store_true", help="print the presets and their settings")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--sample", action="store_true", default=None, help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, help="with sampling (overrides the preset's)")
    parser.add_argument("--top-k", type=int, help="with sampling; 0 = off")
    parser.add_argument("--top-p", type=float, help="with sampling; 1.0 = off")
    parser.add_argument("--num-beams", type=int, help="beam search with this many beams; 1 = off")
    parser.add_argument("--length-penalty", type=float, help="beam score = sum log-prob / length**this")
    parser.add_argument("--repetition-penalty", type=float, help="1.0 = off")
    parser.add_argument("--no-repeat-ngram-size", type=int, help="never repeat an n-gram of this size; 0 = off")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")


def _options(args: argparse.Namespace) -> GenerationOptions:
    """The preset with the explicit flags on top; a bad value is a one-line error naming the flag."""
    from pydantic import ValidationError

    from compress.families.causal_lm.presets import check_preset, preset_options

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads = {args.threads}: must be at least 1 (omit it for all cores)")
    check_preset(args.preset, "--preset")
    given = {key: getattr(args, flag) for flag, key in OVERRIDES.items()}
    try:
        return preset_options(args.preset, given, max_new_tokens=args.max_new_tokens, seed=args.seed)
    except ValidationError as exc:
        flags = {key: flag for flag, key in OVERRIDES.items()}
        shown = [
            f"--{flags.get(str(e['loc'][0]), str(e['loc'][0])).replace('_', '-')} = {e['input']!r}: {e['msg']}"
            if e["loc"]
            else f"--preset {args.preset} with the flags given: {e['msg'].removeprefix('Value error, ')}"
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


class _TextStream:
    """Prints a row's text as its tokens come: the decoded text grows, so only the new suffix is written
    (a token that ends inside a multi-byte character shows once the character is complete)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.tokens, self.shown = tokenizer, [], ""

    def __call__(self, row: int, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        print(text[len(self.shown) :] if text.startswith(self.shown) else text, end="", flush=True)
        self.shown = text


def _open_onnx(path: Path, threads: int) -> OrtCausalLM:
    from google.protobuf.message import DecodeError
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf

    from compress.families.causal_lm.sessions import OrtCausalLM

    try:
        return OrtCausalLM(path, threads=threads)
    except (DecodeError, Fail, InvalidGraph, InvalidProtobuf, ValueError) as exc:  # onnx.load's, ORT's, ours
        raise ConfigError(f"{path}: not a valid ONNX file ({path.stat().st_size} bytes read; {exc})") from None


def generate_command(args: argparse.Namespace) -> int:
    if args.list_presets:
        from compress.families.causal_lm.presets import describe_presets

        print(describe_presets())
        return 0
    if args.artifact is None or not args.prompt:
        raise ConfigError("generate needs an artifact folder and at least one prompt (or --list-presets)")
    options = _options(args)
    artifact = _causal_lm_artifact(args.artifact)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(find_tokenizer_folder(args.artifact))
    threads = args.threads or os.cpu_count() or 1
    from compress.families.causal_lm.task import encode_prompt

    stops = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    options = options.model_copy(update={"stop_token_ids": stops, "pad_token_id": tokenizer.pad_token_id or 0})
    run, engine = _engine(artifact, options, threads)
    rates = []
    for prompt in args.prompt:
        print(prompt, end="", flush=True)
        result = run([encode_prompt(tokenizer, prompt)], _TextStream(tokenizer))
        print(flush=True)
        if result.decode_steps:
            rates.append(result.decode_tokens_per_second)
    rate = f", {sum(rates) / len(rates):.1f} tokens/s decode" if rates else ""
    print(
        f"[{artifact.name}: {artifact.format} {artifact.precision}, {engine}, preset {args.preset}{rate}]", flush=True
    )
    return 0


def _engine(artifact: Artifact, options: GenerationOptions, threads: int) -> tuple[Callable[..., Any], str]:
    """`run(prompts, on_token) -> GenerationResult` for the artifact, and the engine's name: onnxruntime-genai's
    Generator for a genai folder, else our `generate` over the ONNX or torch session."""
    from compress.families.causal_lm.genai_engine import genai_generate, is_genai_folder, open_genai_model
    from compress.families.causal_lm.generate import generate

    if artifact.format == "onnx" and is_genai_folder(artifact.main.parent):
        model = open_genai_model(artifact.main.parent, threads=threads, stop_token_ids=options.stop_token_ids)
        return (lambda prompts, on_token: genai_generate(model, prompts, options, on_token=on_token)), (
            "onnxruntime-genai Generator"
        )
    if artifact.format == "onnx":
        session = _open_onnx(artifact.main, threads)
        return (lambda prompts, on_token: generate(session, prompts, options, on_token=on_token)), "onnxruntime"
    session = _torch_session(artifact.path, threads)
    return (lambda prompts, on_token: generate(session, prompts, options, on_token=on_token)), "torch"


def _torch_session(folder: Path, threads: int) -> TorchCausalLM:
    import torch
    from transformers import AutoModelForCausalLM

    from compress.families.causal_lm.sessions import TorchCausalLM
    from compress.sources import quiet_transformers

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return TorchCausalLM(model, threads=threads)
