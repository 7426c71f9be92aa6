"""Per-step overhead of the NumPy samplers (runtime/scheduler.py), without any network.

The network is a stand-in returning a fixed precomputed array, so the time measured is the sampler's
own work per network call: input scaling, output conversion, step math, noise draws, dtype casts.
``python -m benchmarks.scheduler_overhead [--steps 30] [--repeats 7] [--out FILE.json]`` times every
sampler; ``measure_scheduler_overhead`` is what ``benchmarks/suite.py`` calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime import scheduler as sch

# Stable Diffusion 1.x scheduler_config.json (the shipped PNDM config).
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
}
WARMUP = 1


def measure_scheduler_overhead(sampler: str, steps: int, shape: tuple[int, ...] = (2, 4, 64, 64),
                               repeats: int = 7, *, config: dict | None = None) -> dict[str, Any]:
    """Time ``sample`` over a whole schedule ``repeats`` times (after one untimed warm-up) with
    ``time.perf_counter``; report milliseconds per network call ("step"; heun makes ~2 per step).

    Returns ``{"per_step_ms": median, "median_ms", "min_ms", "max_ms", "calls_per_run", "make_schedule_ms",
    "repeats", "steps", "shape"}`` (median/min/max are per network call).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    shape = tuple(int(d) for d in shape)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(shape, dtype=np.float32)
    fixed_out = (0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    def null_model(x_in: np.ndarray, t: float) -> np.ndarray:
        return fixed_out

    t0 = time.perf_counter()
    schedule = sch.make_schedule(config or SD_SCHEDULER_CONFIG, sampler, steps)
    make_ms = (time.perf_counter() - t0) * 1e3
    latents = sch.prepare_latents(schedule, noise)
    calls = len(schedule.timesteps)
    per_call = []
    for i in range(WARMUP + repeats):
        draw = np.random.default_rng(i)
        t0 = time.perf_counter()
        sch.sample(schedule, null_model, latents, rng=draw)
        elapsed = time.perf_counter() - t0
        if i >= WARMUP:
            per_call.append(elapsed * 1e3 / calls)
    median = statistics.median(per_call)
    return {
        "per_step_ms": median, "median_ms": median, "min_ms": min(per_call), "max_ms": max(per_call),
        "calls_per_run": calls, "make_schedule_ms": make_ms, "repeats": repeats, "warmup": WARMUP,
        "steps": steps, "shape": list(shape),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--shape", type=int, nargs=4, default=(2, 4, 64, 64))
    p.add_argument("--samplers", nargs="*", default=list(sch.SAMPLERS))
    p.add_argument("--out", type=Path, help="write a JSON report here")
    args = p.parse_args(argv)
    results = {}
    for name in args.samplers:
        steps = min(args.steps, 50) if name == "lcm" else args.steps
        r = measure_scheduler_overhead(name, steps, tuple(args.shape), args.repeats)
        results[name] = r
        print(f"{name:16s} {r['median_ms']:7.3f} ms/step (min {r['min_ms']:.3f}, max {r['max_ms']:.3f}; "
              f"{r['calls_per_run']} calls; make_schedule {r['make_schedule_ms']:.2f} ms)")
    if args.out:
        from benchmarks.machine import cpu_info, versions

        report = {"benchmark": "scheduler_overhead", "settings": vars(args) | {"out": str(args.out)},
                  "machine": cpu_info(), "versions": versions(), "results": results}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=list))
    return 0


if __name__ == "__main__":
    sys.exit(main())
