"""Benchmark one artifact in a fresh process, so its peak RSS is its own.

Run by the runner as `python -m compress.bench.worker` with a JSON job on stdin; prints a JSON result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def bench_artifact(job: dict) -> dict:
    from compress.artifact import read_artifact
    from compress.bench.harness import peak_rss_mb
    from compress.config import BenchOptions
    from compress.progress import Reporter
    from compress.registry import registered_adapters

    # The resolved config travels with the job: the pipeline file may have changed since the run started.
    resolved = job["resolved"]
    cls = registered_adapters()[resolved["model"]["family"]]
    adapter = cls(
        cls.model_options.model_validate(resolved["model"]),
        cls.data_options.model_validate(resolved["data"]),
        base_dir=Path(job["base_dir"]),
        cache_dir=Path(job["cache_dir"]),
        reporter=Reporter(quiet=True),
    )
    b = BenchOptions.model_validate(resolved["bench"])
    artifact = read_artifact(Path(job["artifact"]))
    if artifact is None:
        raise SystemExit(f"{job['artifact']}: not a complete artifact")
    rss_before = peak_rss_mb()
    session = adapter.open_session(artifact, threads=b.threads, onnx_provider=b.onnx_providers[0])
    result = adapter.benchmark(session, b, job["machine"])
    return {
        "backend": session.backend,
        "threads": b.threads,
        **result,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_before_session_mb": round(rss_before, 1),
    }


def main() -> None:
    job = json.loads(sys.stdin.read())
    print(json.dumps(bench_artifact(job)))


if __name__ == "__main__":
    main()
