"""Measure the layer-streamed INT4 path on a checkpoint folder: time per layer and peak RSS per phase.

    python scripts/make_shapes.py llama-3.2-3b /tmp/shapes/llama-3.2-3b
    flock /tmp/compress-heavy.lock python scripts/streamed_int4.py /tmp/shapes/llama-3.2-3b /tmp/shapes/work-3b

Phases, each measured with `compress.memory.PeakRss` (this process's resident high-water mark, reset before
the phase): (1) streamed RTN (`compress.quant.streamed.stream_quantize`: one layer in memory at a time; GPTQ with
`--gptq-windows N`, AWQ + RTN on those windows with `--awq`, the kept hidden states in `--activation-dtype`),
(2) the fused INT4 graph written layer by layer from the quantized folder (`build_streamed_decoder`:
onnxruntime-genai's builder on a 2-layer copy, then one layer file at a time; a line per layer), (3) ONNX Runtime
loads the INT4 model and runs a prefill of 8 tokens and one decode step. Prints one JSON line per layer and a
summary line; the work folder is removed at the end unless `--keep`.

Killed and run again with the same work folder, the quantization resumes at the first unfinished layer
(`stream_quantize` verifies the finished ones). Every finished layer and the head step append a line to
`WORK/progress.jsonl` (seconds, reused, the hold's peak RSS so far), so the summary's `quantize_all_holds`
covers every hold: the seconds of layers quantized by earlier runs and the peak over all of them.

On a random-weight folder (scripts/make_shapes.py) only bytes, seconds and memory mean anything: the logits
are checked to be finite, never reported as quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import get_args

import numpy as np
import torch

from compress.memory import PeakRss, current_rss_mb
from compress.quant.algorithms.awq import AWQConfig
from compress.quant.algorithms.gptq import GPTQConfig
from compress.quant.primitives.weight import WeightQuantConfig
from compress.quant.scheme import ActivationDtype
from compress.quant.streamed import LayerTiming, build_streamed_decoder, stream_quantize


def _folder_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9


def decode_step(onnx_dir: Path, threads: int, prompt: int = 8) -> dict[str, float]:
    """Load the builder's model.onnx in ONNX Runtime, prefill `prompt` tokens, then one decode step."""
    import onnxruntime as ort

    cfg = json.loads((onnx_dir / "genai_config.json").read_text())["model"]["decoder"]
    kv, hd = cfg["num_key_value_heads"], cfg["head_size"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values")]
    ids = np.arange(3, 3 + prompt, dtype=np.int64)[None]  # (1, prompt)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    feed.update({n: np.zeros((1, kv, 0, hd), np.float32) for n in past_names})  # (B, kv_heads, 0, head)
    t0 = time.perf_counter()
    outs = session.run(None, feed)
    prefill_ms = 1000 * (time.perf_counter() - t0)
    names = [o.name for o in session.get_outputs()]
    present = {n.replace("present", "past_key_values"): v for n, v in zip(names, outs, strict=True) if "present" in n}
    nxt = np.array([[int(outs[names.index("logits")][0, -1].argmax())]], np.int64)  # (1, 1)
    feed = {"input_ids": nxt, "attention_mask": np.ones((1, prompt + 1), np.int64), **present}
    t0 = time.perf_counter()
    logits = session.run(["logits"], feed)[0]
    step_ms = 1000 * (time.perf_counter() - t0)
    if not np.isfinite(logits).all():
        raise RuntimeError("the decode step returned non-finite logits")
    return {"session_load_s": round(load_s, 1), "prefill_ms": round(prefill_ms, 1), "decode_step_ms": round(step_ms, 1)}


PROGRESS_FILE = "progress.jsonl"


class _Stopped(Exception):
    def __init__(self, layers: int) -> None:
        self.layers = layers


def record_progress(path: Path, hold: str, stop_after: int = 0) -> Callable[[LayerTiming], None]:
    """An `on_layer` callback: appends one JSON line per finished layer (and one for the head step) to `path`
    and prints it; raises `_Stopped` after `stop_after` layers of this hold (0: never). The lines of every
    hold (a run that was killed and resumed is several) are what `summarize_holds` reads."""
    done = [0]

    def on_layer(t: LayerTiming) -> None:
        line = {
            "hold": hold,
            "layer": "head" if t.head else t.index,
            "seconds": round(t.seconds, 2),
            "reused": t.reused,
            "peak_rss_mb": round(t.peak_rss_mb, 1),
        }
        with path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)
        done[0] += not t.head
        if stop_after and done[0] >= stop_after:
            raise _Stopped(done[0])

    return on_layer


def read_progress(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def summarize_holds(lines: list[dict]) -> dict:
    """The quantization over every hold: each layer's seconds from the hold that quantized it (the last one,
    if redone), how many each hold did, the head step's seconds, and the peak RSS over all holds (each line
    carries its hold's high-water mark so far, so a hold killed before it ended still counts)."""
    holds = list(dict.fromkeys(line["hold"] for line in lines))
    measured: dict[int, float] = {}
    by_hold = dict.fromkeys(holds, 0)
    head = None
    for line in lines:
        if line["reused"]:
            continue
        if line["layer"] == "head":
            head = line["seconds"]
        else:
            measured[line["layer"]] = line["seconds"]
            by_hold[line["hold"]] += 1
    return {
        "holds": len(holds),
        "layers_quantized_by_hold": list(by_hold.values()),
        "layer_seconds": _stats([measured[i] for i in sorted(measured)]),
        "head_seconds": head,
        "peak_rss_mb_all_holds": max((line["peak_rss_mb"] for line in lines), default=None),
    }


def _stats(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0}
    return {
        "n": len(seconds),
        "mean": round(float(np.mean(seconds)), 2),
        "min": round(min(seconds), 2),
        "max": round(max(seconds), 2),
        "sum": round(sum(seconds), 1),
    }


def _build_say(t0: float):
    """Print each step of the layer-by-layer ONNX writer with its time since `t0` and the RSS then."""

    def say(message: str) -> None:
        line = {"build": message, "t_s": round(time.perf_counter() - t0, 1), "rss_mb": round(current_rss_mb())}
        print(json.dumps(line), flush=True)

    return say


def trace_rss(every_s: float) -> threading.Event:
    """Print this process's RSS every `every_s` seconds until the returned event is set (where the builder's
    memory goes: its own progress lines are printed in between with --trace-rss)."""
    stop, t0 = threading.Event(), time.perf_counter()

    def loop() -> None:
        while not stop.wait(every_s):
            print(json.dumps({"t_s": round(time.perf_counter() - t0), "rss_mb": round(current_rss_mb())}), flush=True)

    threading.Thread(target=loop, daemon=True).start()
    return stop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_folder", type=Path)
    parser.add_argument("work", type=Path, help="work folder (quantized checkpoint + ONNX), removed unless --keep")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--lm-head", choices=["float", "int4"], default="int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--no-build", action="store_true", help="stop after the streamed quantization")
    parser.add_argument("--gptq-windows", type=int, default=0, help="GPTQ on this many random-token windows")
    parser.add_argument("--window", type=int, default=512, help="tokens per GPTQ calibration window")
    parser.add_argument("--awq", action="store_true", help="with --gptq-windows: AWQ (+RTN) on them instead of GPTQ")
    parser.add_argument(
        "--activation-dtype", choices=get_args(ActivationDtype), default="float32", help="kept hidden states"
    )
    parser.add_argument(
        "--stop-after-layers", type=int, default=0, help="measure the first N layers only (implies --no-build)"
    )
    parser.add_argument("--trace-rss", type=float, default=0, help="print RSS every N s during the build")
    args = parser.parse_args(argv)

    summary: dict = {"source": str(args.hf_folder), "source_gb": round(_folder_gb(args.hf_folder), 2)}
    summary.update(group_size=args.group_size, lm_head=args.lm_head, threads=args.threads)
    cfg, calibration = WeightQuantConfig(group_size=args.group_size), None
    if args.gptq_windows:  # random token ids: the shapes have no tokenizer, and only time and memory count here
        cfg = AWQConfig(group_size=args.group_size) if args.awq else GPTQConfig(group_size=args.group_size)
        vocab = json.loads((args.hf_folder / "config.json").read_text())["vocab_size"]
        gen = torch.Generator().manual_seed(0)
        calibration = [torch.randint(0, vocab, (1, args.window), generator=gen) for _ in range(args.gptq_windows)]
        summary["awq" if args.awq else "gptq"] = {
            "windows": args.gptq_windows,
            "window": args.window,
            "activation_dtype": args.activation_dtype,
        }
    elif args.awq or args.activation_dtype != "float32":
        parser.error("--awq and --activation-dtype need --gptq-windows (calibration windows)")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    progress = args.work / PROGRESS_FILE
    hold = f"{datetime.now(timezone.utc).isoformat(timespec='microseconds')} pid {os.getpid()}"
    t0 = time.perf_counter()
    with PeakRss() as peak:
        try:
            result = stream_quantize(
                args.hf_folder,
                args.work / "gptq",
                cfg,
                lm_head=args.lm_head,
                calibration=calibration,
                activation_dtype=args.activation_dtype,
                on_layer=record_progress(progress, hold, args.stop_after_layers),
            )
        except _Stopped as stop:
            result = None
            summary["stopped_after_layers"] = stop.layers
    summary["quantize"] = {"seconds": round(time.perf_counter() - t0, 1), **peak.result.to_json()}
    summary["quantize_all_holds"] = summarize_holds(read_progress(progress))
    if result is None:  # the first figure of a hold includes the skeleton, and for GPTQ the capture of its inputs
        print(json.dumps({"summary": summary}), flush=True)
        if not args.keep:
            shutil.rmtree(args.work)
        return
    summary["quantize"].update(head_seconds=round(result.head_seconds, 1), gb=round(_folder_gb(result.folder), 2))
    print(json.dumps({"phase": "quantize", **summary["quantize"]}), flush=True)

    if args.no_build:
        print(json.dumps({"summary": summary}), flush=True)
        if not args.keep:
            shutil.rmtree(args.work)
        return
    t0 = time.perf_counter()
    stop = trace_rss(args.trace_rss) if args.trace_rss else threading.Event()
    with PeakRss() as peak:
        onnx_dir = build_streamed_decoder(
            result.folder, args.work / "onnx", lm_head=args.lm_head, verbose=bool(args.trace_rss), say=_build_say(t0)
        )
    stop.set()
    summary["build"] = {"seconds": round(time.perf_counter() - t0, 1), "gb": round(_folder_gb(onnx_dir), 2)}
    summary["build"].update(peak.result.to_json())
    print(json.dumps({"phase": "build", **summary["build"]}), flush=True)

    with PeakRss() as peak:
        summary["ort"] = decode_step(onnx_dir, args.threads)
    summary["ort"].update(peak.result.to_json())
    print(json.dumps({"summary": summary}), flush=True)
    if not args.keep:
        shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
