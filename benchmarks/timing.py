"""Timing and memory primitives shared by the suite and its worker processes."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def measure(fn: Callable[[], Any], *, repeats: int, warmup: int) -> dict[str, Any]:
    """Call `fn` `warmup` times untimed, then `repeats` times timed with `time.perf_counter`.
    Returns median, min and max in seconds plus every sample."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return summarize(times, warmup=warmup, cpu_times=cpu)


def summarize(times: list[float], *, warmup: int = 0, cpu_times: list[float] | None = None) -> dict[str, Any]:
    """Median, min and max of wall times in seconds. `cpu_times` (process CPU seconds of the same
    calls, all threads) adds `cpu_median_s`: on a shared machine wall time grows with the other
    processes' load while CPU seconds mostly do not, so the two together tell contention apart."""
    stats = {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
        "warmup": warmup,
        "times_s": [round(t, 6) for t in times],
    }
    if cpu_times:
        stats["cpu_median_s"] = statistics.median(cpu_times)
    return stats


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark in MiB: Linux's VmHWM (/proc/self/status, KiB),
    which belongs to the process's own address space. Not ru_maxrss there: Linux carries it over
    fork and exec, so a worker started by a parent that once held 13 GB (a benchmark that built the
    full-size folder first) reported 13 GB whatever it used (measured: a child of a 2 GB parent read
    ru_maxrss 2062 MiB, VmHWM 13.6 MiB). Elsewhere ru_maxrss (bytes on macOS)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
