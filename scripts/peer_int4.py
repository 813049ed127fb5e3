"""The plain peer of `pipelines/smollm2-int4.yaml`: ONNX Runtime's own INT4 weight-only quantizer.

    .venv/bin/compress run pipelines/smollm2-int4.yaml      # first: makes runs/smollm2-int4/
    .venv/bin/python scripts/peer_int4.py                    # then this (about 5 minutes on 2 cores)

`onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer` with its default (RTN, asymmetric) and
HQQ algorithms at block 128 and 32 is applied to the run's FP32 ONNX file (`onnx-fp32/model.onnx`), exactly as
ONNX Runtime documents it: every MatMul with a constant weight becomes MatMulNBits, including the lm_head (the
tied float embedding table stays for its Gather). `--accuracy-level` (default 4, as our artifacts) is written
into every MatMulNBits node so both sides use the same kernel: the comparison is about the weights.

Each peer is evaluated with the same code as the run's artifacts: perplexity, agreement and greedy match
through the causal-lm adapter's `evaluate` / `compare` on an `OrtCausalLM` session, decode tokens/s and prefill
through `compress.bench.decoder` with the pipeline's `bench` settings. Our methods' figures are read from
`runs/smollm2-int4/manifest.json`; the table is printed as markdown. Peer files go to
`runs/smollm2-int4/_peers/` (not artifacts of the run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import onnx

PEERS = (("ort-rtn", "DEFAULT", 128), ("ort-rtn", "DEFAULT", 32), ("ort-hqq", "HQQ", 128), ("ort-hqq", "HQQ", 32))


def quantize_peer(src: Path, dst: Path, algorithm: str, block: int, accuracy_level: int) -> float:
    """ONNX Runtime's MatMulNBitsQuantizer with its defaults for `algorithm`; returns seconds."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = (
        DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, accuracy_level=accuracy_level)
        if algorithm == "DEFAULT"
        else HQQWeightOnlyQuantConfig(block_size=block, bits=4)
    )
    start = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
    quantizer.process()
    model = quantizer.model.model
    for node in model.graph.node:  # HQQ's config takes no accuracy level: set it alike on every node
        if node.op_type == "MatMulNBits":
            attrs = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*attrs, onnx.helper.make_attribute("accuracy_level", accuracy_level)])
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dst))
    return time.perf_counter() - start


def our_rows(manifest: dict) -> list[dict]:
    rows = []
    for rec in manifest["artifacts"]:
        art = rec["artifact"]
        ev, llm = rec.get("evaluation") or {}, (rec.get("bench") or {}).get("llm") or {}
        if art["format"] != "onnx":
            continue
        info, cfg = art["info"], art["config"]
        method = info.get("method", "fp32") if art["precision"] == "int4" else "fp32"
        if method == "awq":
            method = f"awq+{info.get('then')}"
        rows.append(
            {
                "artifact": art["name"],
                "method": method,
                "group": cfg.get("group_size", "-"),
                "lm_head": cfg.get("lm_head", "fp32"),
                "ppl": ev.get("metrics", {}).get("ppl"),
                "rise": ev.get("vs_baseline", {}).get("ppl_rise_pct"),
                "agreement": ev.get("vs_baseline", {}).get("agreement"),
                "size_mb": rec["size_bytes"] / 1e6,
                "decode": llm.get("decode_tokens_per_s", {}),
                "seconds": info.get("quantize_seconds"),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="pipelines/smollm2-int4.yaml")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4))
    parser.add_argument("--threads", type=int, default=None, help="evaluation threads (default: the pipeline's)")
    args = parser.parse_args(argv)

    from compress.bench.decoder import bench_decoder, file_bytes, onnx_weight_bytes
    from compress.bench.harness import machine_info
    from compress.config import load_pipeline
    from compress.families.base import Evaluation
    from compress.families.causal_lm.sessions import OrtCausalLM
    from compress.progress import Reporter
    from compress.runner import make_adapter

    cfg = load_pipeline(args.pipeline)
    run_dir = Path(args.runs_dir) / cfg.name
    manifest = json.loads((run_dir / "manifest.json").read_text())
    fp32 = run_dir / "onnx-fp32" / "model.onnx"
    reporter = Reporter()
    adapter = make_adapter(cfg, reporter, Path(args.runs_dir) / ".cache")
    threads = args.threads or cfg.threads
    base = next(r for r in manifest["artifacts"] if r["artifact"]["name"] == manifest["baseline"])
    base_dir = Path(base["artifact"]["path"])
    import numpy as np

    baseline = Evaluation(
        base["evaluation"]["metrics"],
        np.load(base_dir / "_predictions.npy"),
        json.loads((base_dir / "_evaluation.json").read_text()).get("outputs", {}),
    )
    bandwidth = (manifest.get("machine") or machine_info()).get("copy_bandwidth_gbs")
    b = cfg.bench
    rows = our_rows(manifest)
    for label, algorithm, block in PEERS:
        name = f"{label}-g{block}"
        path = run_dir / "_peers" / name / "model.onnx"
        seconds = quantize_peer(fp32, path, algorithm, block, args.accuracy_level)
        ev = adapter.evaluate(OrtCausalLM(path, threads=threads), reporter, name)
        cmp = adapter.compare(ev, baseline)
        with reporter.task(f"benchmark {name}", total=None):
            session = OrtCausalLM(path, threads=b.threads)
            res = bench_decoder(
                session,
                vocab_size=int(session.info["vocab_size"]),
                weight_bytes=onnx_weight_bytes(path),
                size_bytes=file_bytes(path),
                threads=b.threads,
                prompt_lengths=b.prompt_lengths,
                batch_sizes=b.batch_sizes,
                decode_tokens=b.decode_tokens,
                warmup=min(b.warmup, 3),
                iterations=max(3, min(b.iterations, 10)),
                bandwidth_gbs=bandwidth,
            )
        rows.append(
            {
                "artifact": f"peer: {name}",
                "method": "ORT " + ("RTN (default)" if algorithm == "DEFAULT" else "HQQ"),
                "group": block,
                "lm_head": "int4",
                "ppl": ev.metrics["ppl"],
                "rise": cmp["ppl_rise_pct"],
                "agreement": cmp["agreement"],
                "size_mb": path.stat().st_size / 1e6,
                "decode": {str(k): v for k, v in res.decode_tokens_per_s.items()},
                "seconds": round(seconds, 1),
            }
        )
        reporter.log(f"  {name}: ppl {ev.metrics['ppl']:.2f}, decode {res.decode_tokens_per_s}")

    batches = [str(x) for x in b.batch_sizes]
    head = ["artifact", "method", "group", "lm_head", "ppl", "Δppl %", "agreement %", "MB"]
    head += [f"decode tok/s b{x}" for x in batches] + ["quantize s"]
    print(
        f"\nSmolLM2-135M, {cfg.name}: perplexity on {manifest['data']['evaluation'][:12]}, decode with "
        f"{b.threads} thread(s), MatMulNBits accuracy level {args.accuracy_level}\n"
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))

    def fmt(v: object, spec: str) -> str:
        return "-" if v is None else format(v, spec) if isinstance(v, int | float) else str(v)

    for r in rows:
        cells = [
            r["artifact"],
            r["method"],
            str(r["group"]),
            r["lm_head"],
            fmt(r["ppl"], ".2f"),
            fmt(r["rise"], "+.1f"),
            fmt(r["agreement"], ".1f"),
            fmt(r["size_mb"], ".1f"),
        ]
        cells += [fmt(r["decode"].get(x), ".1f") for x in batches] + [fmt(r["seconds"], ".1f")]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
