"""Measure the layer-streamed INT4 path on a checkpoint folder: time per layer and peak RSS per phase.

    python scripts/make_shapes.py llama-3.2-3b /tmp/shapes/llama-3.2-3b
    flock /tmp/compress-heavy.lock python scripts/streamed_int4.py /tmp/shapes/llama-3.2-3b /tmp/shapes/work-3b

Phases, each measured with `compress.memory.PeakRss` (this process's resident high-water mark, reset before
the phase): (1) streamed RTN (`compress.quant.streamed.stream_quantize`: one layer in memory at
a time), (2) the fused INT4 graph written layer by layer from the quantized folder (`build_streamed_decoder`:
onnxruntime-genai's builder on a 2-layer copy, then one layer file at a time; a line per layer), (3) ONNX Runtime
loads the INT4 model and runs a prefill of 8 tokens and one decode step. Prints one JSON line per layer and a
summary line; the work folder is removed at the end unless `--keep`.

On a random-weight folder (scripts/make_shapes.py) only bytes, seconds and memory mean anything: the logits
are checked to be finite, never reported as quality.
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch

from compress.memory import PeakRss, current_rss_mb
from compress.quant.algorithms.gptq import GPTQConfig
from compress.quant.primitives.weight import WeightQuantConfig
from compress.quant.streamed import build_streamed_decoder, stream_quantize


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


class _Stopped(Exception):
    def __init__(self, layers: int) -> None:
        self.layers = layers


_STOPPED_TIMES: list[float] = []


def _stopper(after: int, t0: float):
    """A `say` callback that records the time of each finished layer and stops after `after` layers (0: never).
    The first figure includes the skeleton, and for GPTQ the capture of layer 0's inputs."""
    last = [t0]

    def say(message: str) -> None:
        if not message.startswith("layer "):
            return
        now = time.perf_counter()
        _STOPPED_TIMES.append(round(now - last[0], 2))
        last[0] = now
        if after and len(_STOPPED_TIMES) >= after:
            raise _Stopped(len(_STOPPED_TIMES))

    return say


def _layer_stats(result) -> dict:
    seconds = [t.seconds for t in result.layers if not t.reused]
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
    parser.add_argument(
        "--stop-after-layers", type=int, default=0, help="measure the first N layers only (implies --no-build)"
    )
    parser.add_argument("--trace-rss", type=float, default=0, help="print RSS every N s during the build")
    args = parser.parse_args(argv)

    summary: dict = {"source": str(args.hf_folder), "source_gb": round(_folder_gb(args.hf_folder), 2)}
    summary.update(group_size=args.group_size, lm_head=args.lm_head, threads=args.threads)
    cfg, calibration = WeightQuantConfig(group_size=args.group_size), None
    if args.gptq_windows:  # random token ids: the shapes have no tokenizer, and only time and memory count here
        cfg = GPTQConfig(group_size=args.group_size)
        vocab = json.loads((args.hf_folder / "config.json").read_text())["vocab_size"]
        gen = torch.Generator().manual_seed(0)
        calibration = [torch.randint(0, vocab, (1, args.window), generator=gen) for _ in range(args.gptq_windows)]
        summary["gptq"] = {"windows": args.gptq_windows, "window": args.window}
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with PeakRss() as peak:
        try:
            result = stream_quantize(
                args.hf_folder,
                args.work / "gptq",
                cfg,
                lm_head=args.lm_head,
                calibration=calibration,
                say=_stopper(args.stop_after_layers, t0),
            )
        except _Stopped as stop:
            result = None
            summary["stopped_after_layers"] = stop.layers
    if result is None:
        summary["quantize"] = {"seconds": round(time.perf_counter() - t0, 1), **peak.result.to_json()}
        summary["layer_seconds_incl_capture"] = _STOPPED_TIMES
        print(json.dumps({"summary": summary}), flush=True)
        if not args.keep:
            shutil.rmtree(args.work)
        return
    for t in result.layers:
        print(json.dumps({"layer": t.index, "seconds": round(t.seconds, 2), "reused": t.reused}), flush=True)
    summary["layer_seconds"] = _layer_stats(result)
    summary["quantize"] = {
        "seconds": round(time.perf_counter() - t0, 1),
        "head_seconds": round(result.head_seconds, 1),
        "gb": round(_folder_gb(result.folder), 2),
        **peak.result.to_json(),
    }
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
