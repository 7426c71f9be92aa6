"""One few-step benchmark target in its own process (benchmarks/fewstep.py):
`python -m benchmarks.fewstep_worker TASK.json RESULT.json`, the protocol of benchmarks/protocol.py.

Task kinds:
  prepare    the four diffusers folders (benchmarks/fewstep_folders.py) and their engine folders
             (export.build.build_engine, fp32, shapes fixed at the benchmarked size and batch 1; the
             int8 U-Net added to the tiny-VAE folders when asked); each reused when up to date.
  engine     our pipeline, `runtime.load(engine_dir, backend="openvino", **options).txt2img`
  diffusers  diffusers' own pipeline over the diffusers folder, PyTorch fp32 eager:
             StableDiffusionPipeline (Turbo-style) or LatentConsistencyModelPipeline (LCM), with the
             folder's VAE (AutoencoderTiny in the tiny folders)
Both generation kinds start from the suite's latents (`latents_path`), time `warmup` + `repeats` runs
(benchmarks.protocol.time_runs) and report seconds per stage: the text encoder, one U-Net call, the VAE
decode.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.protocol import StageClock, finish, per_call, save_image, serve, time_runs

PIPELINES = {"turbo": "StableDiffusionPipeline", "lcm": "LatentConsistencyModelPipeline"}


def prepare(task: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.fewstep_folders import make_folders
    from export.build import build_engine
    from export.hashing import file_sha256
    from export.quantize import QuantizeError

    info: dict[str, Any] = {"diffusers_s": make_folders(Path(task["diffusers_root"]), task["model"], task["seed"]),
                            "int8_errors": {}}
    res = task["resolution"]

    def build(name: str, quantize: str | None) -> None:
        t0 = time.perf_counter()
        build_engine(str(Path(task["diffusers_root"]) / name), Path(task["engine_root"]) / name, precision="fp32",
                     min_image=res, opt_image=res, max_image=res, max_batch=1, seed=task["seed"], quantize=quantize,
                     progress=lambda line: print(line, file=sys.stderr, flush=True))
        info[f"engine_s/{name}{'+' + quantize if quantize else ''}"] = time.perf_counter() - t0

    for name in task["folders"]:  # a folder's int8 U-Net is kept: a build without --quantize removes it
        keep = kept_quantization(Path(task["engine_root"]) / name)  # (build-engine's rule), and it took 19 min
        try:
            build(name, keep)
        except QuantizeError:  # a stale folder is rebuilt, and its int8 U-Net with it: failed, it is left out
            build(name, None)
    for name in task["int8_folders"]:  # a failed int8 build fails the int8 target only, and is not retried
        marker = Path(task["engine_root"]) / f"{name}.int8-error.json"  # while the folder stays as it was
        manifest = file_sha256(Path(task["engine_root"]) / name / "manifest.json")
        if marker.is_file() and json.loads(marker.read_text())["manifest_sha256"] == manifest:
            info["int8_errors"][name] = json.loads(marker.read_text())["error"] + f" (recorded in {marker})"
            continue
        try:
            build(name, "int8")
        except QuantizeError as e:
            info["int8_errors"][name] = f"QuantizeError: {e}"
            marker.write_text(json.dumps({"manifest_sha256": manifest, "error": info["int8_errors"][name]}))
    return info


def kept_quantization(engine_dir: Path) -> str | None:
    """The quantization scheme an existing engine folder has ("int8", ...), or None (none, no folder,
    or a manifest that does not load: build-engine rebuilds that folder anyway)."""
    from runtime.errors import ManifestError
    from runtime.folder.manifest import MANIFEST_NAME, load_manifest

    try:
        return load_manifest(engine_dir).quantization if (engine_dir / MANIFEST_NAME).is_file() else None
    except ManifestError:
        return None


def engine(task: dict[str, Any]) -> dict[str, Any]:
    import runtime

    t0 = time.perf_counter()
    pipe = runtime.load(task["engine_dir"], backend="openvino", **task["options"])
    load_s = time.perf_counter() - t0
    latents = np.load(task["latents_path"])
    res, steps = task["resolution"], task["steps"]

    def run():
        r = pipe.txt2img(task["prompt"], height=res, width=res, num_inference_steps=steps,
                         guidance_scale=task["guidance_scale"], seed=task["seed"], latents=latents,
                         output_type="np", progress=False)
        t = r.timings
        return r, {"text_encoder": t.get("text_encoder", 0.0), "unet": t["denoise"] / steps, "unet_calls": steps,
                   "vae_decode": t["vae_decode"], "total": t["total"]}

    out, stats = time_runs(run, task)
    save_image(task, out.images)
    info = {"backend": pipe.backend, "scheduler": out.parameters.get("scheduler"),
            "unet_note": "seconds per U-Net call: the denoise stage over the steps (scheduler math included)"}
    for network in ("unet", "vae_decoder"):
        e = pipe.engines.get(network) if hasattr(pipe, "engines") else None
        if e is not None and hasattr(e, "info"):
            info[f"{network}_engine"] = str(e.info)
    pipe.close()
    return {"load_s": load_s, "e2e": stats, "info": info}


def folder_scheduler(diffusers: Any, folder: str) -> Any:
    """The scheduler its scheduler_config.json names (what the runtime reads), whatever model_index.json
    says: folders made before benchmarks/fewstep_folders.py wrote the Turbo scheduler there too name PNDM."""
    config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    return getattr(diffusers, config["_class_name"]).from_config(config)


def diffusers_peer(task: dict[str, Any]) -> dict[str, Any]:
    import diffusers
    import torch

    t0 = time.perf_counter()
    cls = getattr(diffusers, PIPELINES[task["scenario_kind"]])
    pipe = cls.from_pretrained(task["diffusers_dir"], torch_dtype=torch.float32, safety_checker=None,
                               requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = folder_scheduler(diffusers, task["diffusers_dir"])
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    clock = StageClock()
    clock.wrap(pipe.text_encoder, "forward", "text_encoder")
    clock.wrap(pipe.unet, "forward", "unet")
    clock.wrap(pipe.vae, "decode", "vae_decode")
    latents = torch.from_numpy(np.load(task["latents_path"]))
    res = task["resolution"]

    def run():
        clock.start()
        g = torch.Generator("cpu").manual_seed(task["seed"])
        out = pipe(task["prompt"], height=res, width=res, num_inference_steps=task["steps"],
                   guidance_scale=task["guidance_scale"], generator=g, latents=latents.clone(), output_type="np")
        return out, per_call(clock.take(), "unet")

    with torch.inference_mode():
        out, stats = time_runs(run, task)
    save_image(task, out.images)
    info = {"pipeline": cls.__name__, "scheduler": type(pipe.scheduler).__name__, "vae": type(pipe.vae).__name__,
            "torch_threads": torch.get_num_threads()}
    return {"load_s": load_s, "e2e": stats, "info": info}


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"target": task.get("target"), "status": "ok"}
    t0 = time.perf_counter()
    kinds = {"prepare": lambda t: {"prepare": prepare(t)}, "engine": engine, "diffusers": diffusers_peer}
    if task["kind"] not in kinds:
        raise ValueError(f"unknown few-step task kind {task['kind']!r}")
    result.update(kinds[task["kind"]](task))
    return finish(result, t0)


def main(argv: list[str] | None = None) -> int:
    return serve(run_task, "benchmarks.fewstep_worker", argv)


if __name__ == "__main__":
    sys.exit(main())
