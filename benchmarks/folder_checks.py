"""What the engine-folder checks of issue 18 cost (docs/security.md), as JSON on stdout:

    python -m benchmarks.folder_checks verify DIR                    # default vs verify=True, cold and warm
    python -m benchmarks.folder_checks memory DIR BACKEND SIZE BATCH [--network NAME] [--precision P]

`verify` times `runtime.folder.paths.check_folder` in each mode: cold after `posix_fadvise(DONTNEED)` on
every file of the folder (only this folder's pages leave the page cache), then twice warm. The folder
must have a files table (`build-engine --verify DIR` records one). `memory` reports the peak resident
memory (getrusage) of one fresh process: a one-step guided txt2img of BATCH images of SIZE px, or one
run of NETWORK alone on random feeds (the figures runtime/memory.py is fitted to); run each in its own
process. OpenVINO runs at `--precision` (default f32, the calibration's; bf16 where the CPU has it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import machine


def _drop_cache(folder: Path, files: list[str]) -> None:
    for rel in files:
        fd = os.open(folder / rel, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def verify_costs(folder: Path) -> list[dict[str, Any]]:
    from runtime.folder.paths import check_folder, opened_files
    from runtime.folder.manifest import load_manifest

    manifest = load_manifest(folder)
    runs = []
    for verify in (False, True):
        for cold in (True, False, False):
            if cold:
                _drop_cache(folder, sorted(opened_files(manifest)))
            t0, c0 = time.perf_counter(), time.process_time()
            check = check_folder(folder, manifest, verify=verify)
            runs.append({"mode": check.mode, "cold": cold, "seconds": time.perf_counter() - t0,
                         "cpu_seconds": time.process_time() - c0, "files": check.files,
                         "bytes_read": check.bytes_read, "load_average": os.getloadavg()[0]})
    return runs


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_peak(folder: Path, backend: str, size: int, batch: int, network: str | None,
                precision: str = "f32") -> dict[str, Any]:
    import runtime
    from runtime.engines import open_engines
    from runtime.folder.manifest import load_manifest
    from runtime.folder.networks import axis_values, concrete_shape

    options = {"cache_dir": None, "inference_precision": precision} if backend == "openvino" else {}
    if network is None:
        pipe = runtime.load(folder, backend=backend, calibrate=False, max_memory_gb=float("inf"), **options)
        after_load = _peak()
        pipe.txt2img("a cat", height=size, width=size, num_inference_steps=1, guidance_scale=7.5,
                     num_images_per_prompt=batch, seed=0, output_type="np", progress=False)
    else:
        _, engines = open_engines(folder, backend=backend, networks=(network,), **options)
        after_load = _peak()
        engine, rng = engines[network], np.random.default_rng(0)
        axes = axis_values(load_manifest(folder).dims, batch, size, size)
        engine.run({t.name: rng.standard_normal(concrete_shape(t, axes)).astype(t.dtype) for t in engine.inputs})
    return {"backend": backend, "network": network, "size": size, "batch": batch, "peak_after_load": after_load,
            "peak": _peak(), **({"inference_precision": precision} if backend == "openvino" else {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.folder_checks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("verify").add_argument("folder", type=Path)
    mem = sub.add_parser("memory")
    mem.add_argument("folder", type=Path)
    mem.add_argument("backend")
    mem.add_argument("size", type=int)
    mem.add_argument("batch", type=int)
    mem.add_argument("--network", default=None)
    mem.add_argument("--precision", default="f32", help="OpenVINO's inference precision (f32, bf16)")
    args = parser.parse_args(argv)
    if args.what == "verify":
        result: Any = verify_costs(args.folder)
    else:
        result = memory_peak(args.folder, args.backend, args.size, args.batch, args.network, args.precision)
    json.dump({"machine": machine(), "result": result}, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
