"""Peak RSS and time of one static INT8 calibration (`compress.quant.calibration.compute_ranges`) on an ONNX
vision graph, with random inputs of its own shape: the figure behind the README's calibration-memory line.

    python scripts/calibration_memory.py MODEL.onnx --calibrator percentile --samples 512

Prints one table row; run it once per calibrator, in a fresh process each (peak RSS is the process's).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from compress.quant.calibration import compute_ranges
from compress.stages.quantize.int8 import pre_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--calibrator", default="percentile", choices=["minmax", "entropy", "percentile", "per-tensor"])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    graph = onnx.load(str(args.model), load_external_data=False).graph
    name = graph.input[0].name
    shape = [args.batch] + [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]]
    tmp = Path(tempfile.mkdtemp())
    pre_process(str(args.model), str(tmp / "pre.onnx"))

    def batches():
        rng = np.random.default_rng(0)
        for _ in range(args.samples // args.batch):
            yield {name: rng.standard_normal(shape, dtype=np.float32)}

    start = time.perf_counter()
    compute_ranges(
        tmp / "pre.onnx",
        batches,
        calibrator=args.calibrator,
        percentile=99.999,
        op_types=None,
        cache=tmp / "ranges.json",
        large=False,
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("| calibrator | samples | input | seconds | peak RSS MB |\n|---|---|---|---|---|")
    print(f"| {args.calibrator} | {args.samples} | {'x'.join(map(str, shape))} | {seconds:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
