"""`compress generate ARTIFACT PROMPT...`: text from any causal-lm artifact of a run.

The tokenizer is found by walking the artifact's parents (each `artifact.json` names its parent, a sibling
folder of the run) up to the first folder that holds tokenizer files: the source or a torch stage.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from compress.errors import ConfigError

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


def generate_command(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from compress.artifact import read_artifact
    from compress.llm.generate import GenerationOptions, OrtCausalLM

    artifact = read_artifact(args.artifact)
    if artifact is None:
        raise ConfigError(f"{args.artifact}: not a complete artifact folder (no artifact.json)")
    tokenizer = AutoTokenizer.from_pretrained(find_tokenizer_folder(args.artifact))
    threads = args.threads or os.cpu_count() or 1
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in args.prompt]
    stops = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    options = GenerationOptions(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop_token_ids=stops,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    if artifact.format == "onnx":
        result = OrtCausalLM(artifact.main, threads=threads).generate(prompts, options)
        tokens, speed = result.tokens, result.decode_tokens_per_second
    elif artifact.format == "torch":
        tokens, speed = _torch_generate(artifact.path, prompts, options, threads), None
    else:
        raise ConfigError(f"{args.artifact}: cannot generate from a {artifact.format} artifact")
    for prompt, new in zip(args.prompt, tokens, strict=True):
        print(prompt + tokenizer.decode(new, skip_special_tokens=True))
    rate = f", {speed:.1f} tokens/s decode" if speed else ""
    print(f"[{artifact.name}: {artifact.format} {artifact.precision}{rate}]", flush=True)
    return 0


def _torch_generate(folder: Path, prompts: list[list[int]], options, threads: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    from compress.llm.sources import quiet_transformers

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
