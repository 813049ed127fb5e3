"""SmolLM2 genai file with three lm_heads on one GPTQ g32 body: the builder's 8-bit RTN, our 4-bit RTN, our
4-bit GPTQ. Prints file MB and perplexity on the pipeline's own evaluation windows (README, genai section).

    flock /tmp/compress-heavy.lock .venv/bin/python scripts/lm_head_ab.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from compress.bench.decoder import file_bytes
from compress.config import load_pipeline
from compress.families.causal_lm.model_io import convert_gguf, load_torch
from compress.families.causal_lm.sessions import OrtCausalLM
from compress.families.causal_lm.task import perplexity
from compress.genai.build import build_fused_decoder
from compress.progress import Reporter
from compress.quant.algorithms.gptq import GPTQConfig, gptq_quantize_head, gptq_quantize_model
from compress.quant.algorithms.rtn import rtn_quantize
from compress.quant.primitives.weight import WeightQuantConfig
from compress.runner import make_adapter
from compress.sources import local_target, parse_source

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "smollm2-int4-genai.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lm_head_ab"))
    out_dir = parser.parse_args().out
    torch.manual_seed(0)
    t0 = time.perf_counter()
    cfg = load_pipeline(PIPELINE)
    adapter = make_adapter(cfg, Reporter(), out_dir / ".cache")
    windows = adapter.windows["evaluation"]
    _, rest = local_target(*parse_source(cfg.model.source))
    model = load_torch(convert_gguf(Path(rest), cache_dir=out_dir / ".cache" / "models"))
    calib = [torch.from_numpy(np.ascontiguousarray(b["input_ids"])) for b in adapter.calibration_inputs(16)]
    qws = gptq_quantize_model(model, calib, config=GPTQConfig(group_size=32, symmetric=False, act_order=True))
    print(f"body GPTQ g32: {len(qws)} Linears in {time.perf_counter() - t0:.0f} s", flush=True)
    float_head = model.lm_head.weight.detach().clone()
    rows = []
    for variant in ("int8-builder-rtn", "int4-rtn", "int4-gptq"):
        with torch.no_grad():
            model.lm_head.weight.copy_(float_head)
        quantized = dict(qws)
        if variant == "int4-rtn":
            quantized["lm_head"] = rtn_quantize(model.lm_head.weight, WeightQuantConfig(group_size=32))
            with torch.no_grad():
                model.lm_head.weight.copy_(quantized["lm_head"].dequantize())
        elif variant == "int4-gptq":
            quantized["lm_head"] = gptq_quantize_head(
                model, calib, "lm_head", GPTQConfig(group_size=32, act_order=True)
            )
        folder = out_dir / f"hf-{variant}"
        shutil.rmtree(folder, ignore_errors=True)
        adapter.save_torch(model, folder)
        built = build_fused_decoder(
            folder,
            out_dir / variant,
            precision="int4",
            quantized=quantized,
            block_size=32,
            symmetric=False,
            lm_head="int8" if variant == "int8-builder-rtn" else "int4",
        )
        shutil.rmtree(folder)
        ppl = perplexity(OrtCausalLM(built / "model.onnx", threads=2).logits, windows).perplexity
        rows.append({"lm_head": variant, "file_mb": round(file_bytes(built / "model.onnx") / 1e6, 2), "ppl": ppl})
        print(json.dumps(rows[-1]), flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
