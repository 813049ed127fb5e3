"""Time AutoRound on SmolLM2's first decoder block only (the others kept float), to size a full run (README,
"Quantize options"): `python scripts/autoround_block.py ITERS [--amp] [--samples N]`, under the heavy-run lock."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from compress.config import load_pipeline
from compress.progress import Reporter
from compress.quant.algorithms.autoround import AutoRoundConfig, autoround_quantize_model
from compress.runner import make_adapter

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "smollm2-int4.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("iters", type=int)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows (512 tokens)")
    parser.add_argument("--cache", type=Path, default=Path("runs/.cache"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    adapter = make_adapter(load_pipeline(PIPELINE), Reporter(quiet=True), args.cache)
    model, _ = adapter.load_source()
    batches = [torch.from_numpy(b["input_ids"]) for b in adapter.calibration_inputs(args.samples, 1)]
    start = time.perf_counter()
    qws = autoround_quantize_model(
        model,
        adapter.tokenizer,
        batches,
        layers_filter=lambda name, _: name.startswith("model.layers.0."),
        config=AutoRoundConfig(group_size=32, iters=args.iters, amp=args.amp),
    )
    seconds = time.perf_counter() - start
    print(f"iters {args.iters} amp {args.amp} samples {args.samples}: {len(qws)} Linears of block 0 in {seconds:.1f} s")


if __name__ == "__main__":
    main()
