"""One step of the SDXL benchmark (benchmarks/sdxl.py) in its own process:
`python -m benchmarks.sdxl_worker TASK.json RESULT.json`, the protocol of benchmarks/protocol.py.

Task kinds:
  prepare    the diffusers folder of the preset's random weights (benchmarks/worker.py save_random),
             unless it is there
  build      the engine folder (export.build.build_engine: reused when up to date). This process is
             the build: its wall time and peak RSS (VmHWM) are the build's, written to `record_path`
             when the folder is (re)built and read back from there when it is reused. With `quantize`
             (a --quantize scheme) it adds that scheme in place and records apart; without, it keeps
             the scheme the folder has (a plain build-engine would remove it)
  ours       our pipeline on the engine folder with OpenVINO (`options`: default precision, or f32):
             scenario "unet" opens the U-Net alone and times one call at batch 2 on the suite's feeds;
             "e2e" times txt2img from the suite's latents (benchmarks/protocol.py time_e2e)
  diffusers  diffusers 0.42, PyTorch fp32 eager: UNet2DConditionModel alone ("unet"), or
             StableDiffusionXLPipeline ("e2e"), over the diffusers folder
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.protocol import finish, precision_name, save_image, serve, time_e2e, time_network
from benchmarks.timing import peak_rss_mb

OURS_OPTIONS = {"default": {}, "f32": {"inference_precision": "f32"}}


def prepare(task: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.worker import save_random

    return {"diffusers_s": save_random(Path(task["diffusers_dir"]), task["model"], task["weights_seed"])}


def folder_identity(manifest: Path, quantize: str | None) -> str:
    """What a build record vouches for: the graphs (the manifest's networks and source) for the build,
    the whole manifest for a --quantize step, so adding a scheme in place keeps the build's record."""
    import hashlib

    from export.hashing import file_sha256

    if quantize:
        return file_sha256(manifest)
    m = json.loads(manifest.read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps({k: m.get(k) for k in ("networks", "source")}, sort_keys=True).encode()).hexdigest()


def build(task: dict[str, Any]) -> dict[str, Any]:
    """build_engine, and the record of the build that made the folder now there."""
    from export.build import build_engine

    from benchmarks.fewstep_worker import kept_quantization

    engine, record_path, scheme = Path(task["engine_dir"]), Path(task["record_path"]), task.get("quantize")
    manifest = engine / "manifest.json"
    before = folder_identity(manifest, scheme) if manifest.is_file() else None
    kept = scheme or kept_quantization(engine)
    options = {**task["build_options"], **({"quantize": kept} if kept else {})}
    t0 = time.perf_counter()
    build_engine(task["diffusers_dir"], engine, **options, progress=lambda line: print(line, file=sys.stderr, flush=True))
    build_s, after = time.perf_counter() - t0, folder_identity(manifest, scheme)
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    if before == after:
        if record is not None and record.get("folder_identity") == after:
            return {"reused": True, "record": record, "check_s": build_s}
        return {"reused": True, "record": None, "check_s": build_s,
                "note": "the folder predates this benchmark's build record (delete it to measure its build)"}
    record = {"build_s": build_s, "peak_rss_mb": peak_rss_mb(), "folder_identity": after,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "options": options}
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return {"reused": False, "record": record}


def _feeds(task: dict[str, Any]) -> dict[str, np.ndarray]:
    with np.load(task["feeds_path"]) as data:
        return {k: data[k] for k in data.files}


def _precision(info: Any, quantized: bool) -> str:
    """The row's precision: the compute precision, "+int8w" where the weights are int8."""
    return precision_name(info.compute) + ("+int8w" if quantized else "")


def ours(task: dict[str, Any]) -> dict[str, Any]:
    quantized = bool(task.get("quantized"))
    options = {**OURS_OPTIONS[task["precision"]], "quantized": quantized}  # False: the graphs, even beside int8 IRs
    if task["scenario"]["kind"] == "unet":
        from runtime.engines import open_engines

        t0 = time.perf_counter()
        _, engines = open_engines(task["engine_dir"], backend="openvino", networks=("unet",), **options)
        engine, feeds = engines["unet"], _feeds(task)
        try:
            _, stats = time_network(lambda: engine.run(feeds), feeds, task, batch=2, load_s=time.perf_counter() - t0)
            return {"unet": stats, "precision": _precision(engine.info, quantized), "info": {"engine": str(engine.info)}}
        finally:
            engine.close()
    import runtime

    t0 = time.perf_counter()
    with runtime.load(task["engine_dir"], backend="openvino", **options) as pipe:
        load_s, latents, res = time.perf_counter() - t0, np.load(task["latents_path"]), task["resolution"]

        def run(n: int):
            return pipe.txt2img(task["prompt"], height=res, width=res, num_inference_steps=n,
                                guidance_scale=task["guidance_scale"], scheduler="euler",
                                timestep_spacing=task["scenario"]["spacing"], seed=task["seed"], latents=latents,
                                output_type="np", progress=False)

        out, stats = time_e2e(run, task)
        save_image(task, out.images)
        stats.update(stage_timings=dict(out.timings), sampler=out.parameters.get("scheduler"))
        info = pipe.engines["unet"].info
    return {"e2e": stats, "load_s": load_s, "precision": _precision(info, quantized), "info": {"engine": str(info)}}


def diffusers_peer(task: dict[str, Any]) -> dict[str, Any]:
    import diffusers
    import torch

    t0 = time.perf_counter()
    folder, res = Path(task["diffusers_dir"]), task["resolution"]
    with torch.inference_mode():
        if task["scenario"]["kind"] == "unet":
            unet = diffusers.UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=torch.float32,
                                                                  local_files_only=True)
            f = {k: torch.from_numpy(v) for k, v in _feeds(task).items()}
            added = {"text_embeds": f["text_embeds"], "time_ids": f["time_ids"]}
            load_s = time.perf_counter() - t0
            _, stats = time_network(lambda: unet(f["sample"], f["timestep"], f["encoder_hidden_states"],
                                                 added_cond_kwargs=added, return_dict=False)[0],
                                    f, task, batch=2, load_s=load_s)
            return {"unet": stats, "precision": "f32", "info": {"torch_threads": torch.get_num_threads()}}
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder), torch_dtype=torch.float32,
                                                                   local_files_only=True, add_watermarker=False)
        if task["scenario"]["spacing"]:
            pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(
                pipe.scheduler.config, timestep_spacing=task["scenario"]["spacing"])
        pipe.set_progress_bar_config(disable=True)
        load_s, latents = time.perf_counter() - t0, torch.from_numpy(np.load(task["latents_path"]))

        def run(n: int):
            return pipe(task["prompt"], height=res, width=res, num_inference_steps=n,
                        guidance_scale=task["guidance_scale"], latents=latents.clone(), output_type="np")

        out, stats = time_e2e(run, task)
    save_image(task, out.images)
    stats.update(sampler=type(pipe.scheduler).__name__)
    return {"e2e": stats, "load_s": load_s, "precision": "f32", "info": {"torch_threads": torch.get_num_threads()}}


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    kinds = {"prepare": lambda t: {"prepare": prepare(t)}, "build": lambda t: {"build": build(t)},
             "ours": ours, "diffusers": diffusers_peer}
    if task["kind"] not in kinds:
        raise ValueError(f"unknown SDXL benchmark task kind {task['kind']!r}")
    result: dict[str, Any] = {"target": task.get("target"), "status": "ok"}
    t0 = time.perf_counter()
    result.update(kinds[task["kind"]](task))
    return finish(result, t0)


def main(argv: list[str] | None = None) -> int:
    return serve(run_task, "benchmarks.sdxl_worker", argv)


if __name__ == "__main__":
    sys.exit(main())
