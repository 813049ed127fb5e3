"""Latency, throughput and memory of a callable, and a description of the machine.

Timing: `warmup` untimed calls, then `iterations` timed calls with `time.perf_counter`; p50 / p90 / p99
are percentiles of those per-call times. Two busy threads on two cores distort timings badly, so the
thread count is fixed and recorded, and the report says what else to keep quiet.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Latency:
    batch_size: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # items per second at this batch size (from the mean)

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def measure(fn: Callable[[], object], *, batch_size: int, warmup: int, iterations: int) -> Latency:
    for _ in range(warmup):
        fn()
    times = np.empty(iterations)
    for i in range(iterations):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    ms = times * 1e3
    return Latency(
        batch_size=batch_size,
        iterations=iterations,
        p50_ms=float(np.percentile(ms, 50)),
        p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=float(ms.mean()),
        throughput=float(batch_size / times.mean()),
    )


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB.

    Read from VmHWM in /proc/self/status where available: getrusage's ru_maxrss survives fork + exec, so
    a worker would report its parent's peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx_vnni")


#: integer dot-product instructions that accumulate u8·s8 into int32 without an int16 intermediate
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or "", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return model, flags


def int8_dot_saturates() -> bool:
    """True on an x86 CPU without VNNI: ONNX Runtime's u8·s8 kernels then use VPMADDUBSW, whose int16
    pair sums saturate (ORT's quantization docs: try `reduce_range` or evaluate on the deployment CPU)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return not (_cpuinfo()[1] & VNNI_FLAGS)


def machine_info() -> dict[str, object]:
    """CPU model, the SIMD flags that matter for INT8/BF16 kernels, core count, library versions."""
    model, flags = _cpuinfo()
    info: dict[str, object] = {
        "cpu": model,
        "cpu_flags": [f for f in _FLAGS if f in flags],
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "os": platform.platform(),
    }
    info["copy_bandwidth_gbs"] = round(copy_bandwidth_gbs(), 2)
    for name in ("torch", "onnxruntime", "onnx"):
        try:
            from importlib.metadata import version

            info[name] = version(name)
        except Exception:
            info[name] = None
    return info


def copy_bandwidth_gbs(size_mb: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth from the best of `repeats` numpy copies of `size_mb` ((read + write) bytes / s).

    Measured once in the runner's process, not in benchmark workers, whose peak RSS it would inflate.
    """
    src = np.ones(size_mb * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9
