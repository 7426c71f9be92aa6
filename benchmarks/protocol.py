"""The worker protocol every benchmark worker speaks: `python -m MODULE TASK.json RESULT.json`.

The suite (`benchmarks/suite.py` `_run_worker`) writes a task, runs a worker module in a fresh
process (`benchmarks/worker.py` in this env; `benchmarks/peers/<runner>_worker.py` with its peer's
venv Python, from the repository root) and reads the result back. This module is that exchange,
written once:
  - `serve(run_task, module)`: the worker's main(): read TASK.json, call `run_task(task)`, write
    RESULT.json; an exception becomes a result with status "failed", its reason and traceback, and
    exit code 1;
  - `finish(result, t0)`: the fields every result ends with (`wall_s`, `peak_rss_mb`);
  - `time_network(call, feeds, task, ...)`: one network timed as every target times it (a first call
    timed apart, then `measure` over the task's repeats / warmup);
  - `time_e2e(run, task)`: txt2img end to end as every peer times it (`e2e_warmup` runs at 2 steps,
    then `e2e_repeats` timed runs of `steps` steps, wall and CPU seconds);
  - `time_runs(run, task)` and `StageClock`: a few-step image end to end with its seconds per stage
    (benchmarks/fewstep.py);
  - `save_outputs` / `save_image`: the arrays the suite reads back for parity and image PSNR;
  - `versions(packages)`: the installed versions a peer records; `precision_name(value)`: the
    precision a target ran at, named alike for every target ("bf16", "f32", "f16").

Standard library and NumPy only (with `benchmarks.timing`, itself standard library only): the peers'
venvs have NumPy and their own packages, not this project's (tests/test_benchmark_peers.py checks it).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.timing import measure, peak_rss_mb, summarize

Task = dict[str, Any]


def serve(run_task: Callable[[Task], dict[str, Any]], module: str, argv: list[str] | None = None) -> int:
    """A worker's main(): `argv` (default sys.argv[1:]) is TASK.json RESULT.json. Returns the exit
    code: 0 when the result's status is "ok", 1 when the task failed, 2 for a wrong command line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(f"usage: python -m {module} TASK.json RESULT.json", file=sys.stderr)
        return 2
    task = json.loads(Path(args[0]).read_text())
    try:
        result = run_task(task)
    except Exception as e:  # reported to the parent, which records the target as failed
        result = {"target": task.get("target"), "status": "failed", "reason": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc(limit=8), "peak_rss_mb": peak_rss_mb()}
    Path(args[1]).write_text(json.dumps(result, indent=1, default=jsonable))
    return 0 if result["status"] == "ok" else 1


def jsonable(value: Any) -> Any:
    """`json.dumps` default: NumPy scalars as numbers, anything else as its str()."""
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


def finish(result: dict[str, Any], t0: float) -> dict[str, Any]:
    """Close `result`: wall seconds since `t0` (perf_counter) and this process's peak RSS."""
    result["wall_s"] = time.perf_counter() - t0
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def time_network(call: Callable[[], Any], feeds: dict[str, np.ndarray], task: Task, *, batch: int,
                 **fields: Any) -> tuple[Any, dict[str, Any]]:
    """Time one network: a first call (compiles / allocates) timed apart, then `task["repeats"]`
    timed calls after `task["warmup"]` untimed ones. Returns (the first call's output, stats with
    `fields`, first_call_s, batch and the feeds' shapes)."""
    t0 = time.perf_counter()
    out = call()
    first_s = time.perf_counter() - t0
    stats = measure(call, repeats=task["repeats"], warmup=task["warmup"])
    stats.update(fields, first_call_s=first_s, batch=batch, shapes={k: list(v.shape) for k, v in feeds.items()})
    return out, stats


def time_e2e(run: Callable[[int], Any], task: Task) -> tuple[Any, dict[str, Any]]:
    """txt2img end to end: `run(n)` generates at n steps. `task["e2e_warmup"]` runs at 2 steps (or
    fewer, never more than `steps`) compile every shape, then `task["e2e_repeats"]` runs at
    `task["steps"]` are timed (wall and process CPU seconds). Returns (the last run's output, stats
    with `steps`)."""
    steps = task["steps"]
    for _ in range(task["e2e_warmup"]):
        run(min(2, steps))
    times, cpu = [], []
    out = None
    for _ in range(task["e2e_repeats"]):
        c0, t0 = time.process_time(), time.perf_counter()
        out = run(steps)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    stats = summarize(times, warmup=task["e2e_warmup"], cpu_times=cpu)
    stats.update(steps=steps)
    return out, stats


def save_outputs(task: Task, outputs: dict[str, np.ndarray]) -> None:
    """Network outputs (keys NETWORK/OUTPUT) to `task["outputs_path"]`, for the suite's parity."""
    if task.get("outputs_path") and outputs:
        np.savez(task["outputs_path"], **outputs)


def save_image(task: Task, images: Any, key: str = "image_path") -> None:
    """Images as a float32 array to `task[key]` when the task asks, for the suite's image PSNR."""
    if task.get(key):
        np.save(task[key], np.asarray(images, np.float32))


# An inference precision as OpenVINO, our EngineInfo or torch spell it -> the report's name for it
_PRECISIONS = {"bf16": "bf16", "bfloat16": "bf16", "f32": "f32", "fp32": "f32", "float32": "f32", "f16": "f16",
               "fp16": "f16", "float16": "f16"}


def precision_name(value: Any) -> str:
    """"bf16", "f32" or "f16" for a precision however it is spelled (OpenVINO's `<Type: 'bfloat16'>`,
    "bf16", "fp32", torch.float32 ...); anything else as its str()."""
    text = str(value).lower().replace("torch.", "")
    for word in text.replace("'", " ").replace("<", " ").replace(">", " ").replace(":", " ").split():
        if word in _PRECISIONS:
            return _PRECISIONS[word]
    return str(value)


def versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Python's version and each installed distribution's (None when absent)."""
    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


class StageClock:
    """Seconds per named stage within one run, for pipelines whose stages are Python calls
    (diffusers, optimum-intel): `wrap(obj, attr, stage)` replaces `obj.attr` by a timed call that adds
    to the current run's `stage` (and counts calls in `STAGE_calls`); `start()` opens a run,
    `take()` returns and closes it."""

    def __init__(self) -> None:
        self._run: dict[str, float] = {}

    def wrap(self, obj: Any, attr: str, stage: str) -> None:
        inner = getattr(obj, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._run[stage] = self._run.get(stage, 0.0) + time.perf_counter() - t0
                self._run[f"{stage}_calls"] = self._run.get(f"{stage}_calls", 0) + 1

        setattr(obj, attr, timed)

    def start(self) -> None:
        self._run = {}

    def take(self) -> dict[str, float]:
        run, self._run = self._run, {}
        return run


def per_call(stages: dict[str, float], stage: str) -> dict[str, float]:
    """`stages` with `stage` (total seconds of its calls in one run) turned into seconds per call."""
    calls = stages.get(f"{stage}_calls") or 1
    return {**stages, stage: stages.get(stage, 0.0) / calls} if stage in stages else stages


def time_runs(run: Callable[[], tuple[Any, dict[str, float]]], task: Task) -> tuple[Any, dict[str, Any]]:
    """A few-step image end to end (benchmarks/fewstep.py): `task["warmup"]` untimed runs (the
    first compiles), then `task["repeats"]` timed ones. `run()` returns (output, that run's seconds
    per stage: text_encoder, unet per call, vae_decode). Stats: the end-to-end median/min/max (wall
    and CPU) and, per stage, the median over the timed runs (`stages`) with every run's (`stage_runs`)."""
    for _ in range(task["warmup"]):
        run()
    times, cpu, runs = [], [], []
    out = None
    for _ in range(task["repeats"]):
        c0, t0 = time.process_time(), time.perf_counter()
        out, stages = run()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        runs.append(stages)
    stats = summarize(times, warmup=task["warmup"], cpu_times=cpu)
    keys = sorted({k for r in runs for k in r})
    stats["stages"] = {k: statistics.median(r[k] for r in runs if k in r) for k in keys}
    stats["stage_runs"] = runs
    return out, stats


def link_tree(src: Path, dst: Path, skip: tuple[str, ...]) -> None:
    """Recreate `src` under `dst` with every file hard-linked (copied across file systems), except
    the top-level entries named in `skip` (the few-step folders share a model's files, peers' too)."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] in skip or not path.is_file():
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dst / rel)
        except OSError:
            shutil.copy2(path, dst / rel)
