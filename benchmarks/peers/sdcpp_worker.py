"""The stable-diffusion.cpp peer, run with the sdcpp venv's Python (benchmarks/peers/setup-sdcpp.sh):
`.venv-sdcpp/bin/python -m benchmarks.peers.sdcpp_worker TASK.json RESULT.json`.

Loads the single-file checkpoint (`export.loading.save.save_single_file` of the benchmark's diffusers
folder, written by the suite) with `stable_diffusion_cpp.StableDiffusion` and times txt2img end to
end only: stable-diffusion.cpp has no per-network call. Settings that differ from the other targets
because stable-diffusion.cpp lacks them, all recorded in the result:
  - sampler: `sample_method` (default "ipndm", the improved PNDM of Zhang & Chen, arXiv:2204.13902, the
    PNDM family member it has) on its "discrete" schedule; one U-Net evaluation per step, with the
    conditional and unconditional passes as two batch-1 calls;
  - initial noise: its own RNG from `seed` (no latents input), so its image is not comparable
    pixel for pixel with the others;
  - threads: `n_threads` (default: every usable CPU; the binding's own default is half of them).
Verbose by default: the binding hides stable-diffusion.cpp's own errors otherwise (a checkpoint it
cannot read ends in a crash whose only explanation is that log, which the suite keeps the tail of).
Imports only numpy, stable_diffusion_cpp and benchmarks.protocol (the standard library).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

from benchmarks.protocol import finish, save_image, serve, time_e2e, versions

DEFAULT_SAMPLER = "ipndm"
PACKAGES = ("stable_diffusion_cpp_python", "numpy", "pillow")


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load(task: dict[str, Any]):
    """(StableDiffusion, load_s, info) for the task's checkpoint and weight type."""
    from stable_diffusion_cpp import StableDiffusion

    threads = int(task.get("threads") or usable_cpus())
    t0 = time.perf_counter()
    sd = StableDiffusion(model_path=task["single_file"], n_threads=threads, wtype=task["wtype"],
                         verbose=bool(task.get("verbose", True)))
    load_s = time.perf_counter() - t0
    info = {"wtype": task["wtype"], "threads": threads, "sampler": task.get("sampler", DEFAULT_SAMPLER),
            "scheduler": "discrete", "checkpoint": task["single_file"], "versions": versions(PACKAGES)}
    return sd, load_s, info


def e2e(task: dict[str, Any], sd) -> dict[str, Any]:
    """txt2img: one 2-step warm-up, then `e2e_repeats` timed runs (PIL image to float32 included,
    as the other targets return float32 arrays)."""
    res = task["resolution"]
    sampler = task.get("sampler", DEFAULT_SAMPLER)

    def run(n: int) -> np.ndarray:
        images = sd.generate_image(prompt=task["prompt"], negative_prompt="", width=res, height=res,
                                   cfg_scale=task["guidance_scale"], sample_method=sampler, scheduler="discrete",
                                   sample_steps=n, seed=task["seed"], batch_count=task["batch"])
        return np.stack([np.asarray(im.convert("RGB"), np.float32) / 255.0 for im in images])

    image, stats = time_e2e(run, task)
    save_image(task, image)
    stats.update(sampler=f"{sampler} (stable-diffusion.cpp, discrete schedule)")
    return stats


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    if task["kind"] != "peer":
        raise ValueError(f"unknown task kind {task['kind']!r} for the sdcpp peer")
    if task["networks"]:
        raise ValueError("the sdcpp peer is measured end to end only (stable-diffusion.cpp has no per-network call)")
    result: dict[str, Any] = {"target": task.get("target"), "status": "ok"}
    t0 = time.perf_counter()
    sd, result["load_s"], result["info"] = load(task)
    if task["e2e"]:
        result["e2e"] = e2e(task, sd)
    return finish(result, t0)


def main(argv: list[str] | None = None) -> int:
    return serve(run_task, "benchmarks.peers.sdcpp_worker", argv)


if __name__ == "__main__":
    sys.exit(main())
