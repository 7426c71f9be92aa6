"""One benchmark target measured in its own process: `python -m benchmarks.worker TASK.json RESULT.json`.

A fresh process per target keeps the peak-RSS figure that target's own (VmHWM, benchmarks/timing.py
peak_rss_mb, is the high-water mark of the process's own address space) and stops thread pools,
allocator caches and compiled kernels of one framework from slowing the next. The parent (`benchmarks/suite.py`) writes the task, reads the result; the
exchange and the timing loops every worker shares are `benchmarks/protocol.py`.

Targets:
  engine  one of our backends over the engine folder: per-network calls through
          `runtime.engines.<backend>.open_engine`, end to end through `runtime.load(...).txt2img`.
  peer    diffusers' StableDiffusionPipeline over the diffusers folder holding the same weights,
          in float32 or bfloat16 eager (torch.compile on CUDA only).
  prepare build the benchmark cache (diffusers folder from the preset's random weights, engine
          folder from that diffusers folder); run in a child so the parent stays small.
  single_file  save that diffusers folder as a single-file checkpoint for the sdcpp peer.
The peers outside this env (optimum-intel, stable-diffusion.cpp) have their own workers under
benchmarks/peers/, run with their venv's Python.

Per-network feeds are the same seeded NumPy arrays for every target (`network_feeds`), and each
target saves its outputs so the parent can report parity against the fp32 reference.
"""

from __future__ import annotations

import gc
import importlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.protocol import finish, save_image, save_outputs, serve, time_e2e, time_network
from benchmarks.timing import summarize
from runtime.folder.networks import ModelDims, axis_values, concrete_shape, network_io

PROMPT = "a photograph of an astronaut riding a horse"
# CLIP BPE token ids (export/assets/clip-bpe/vocab.json): <|startoftext|>, <|endoftext|>.
BOS, EOS = 49406, 49407


def network_batch(network: str, batch: int, guidance: bool) -> int:
    """Batch a network sees in one txt2img call of `batch` images: the text encoder and the U-Net
    run the [negative, positive] pair together under classifier-free guidance."""
    return 2 * batch if guidance and network in ("text_encoder", "unet") else batch


def network_feeds(network: str, dims: ModelDims, batch: int, resolution: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded fp32/int32 inputs of `network` (shapes from runtime/folder/networks.py), identical in every process."""
    rng = np.random.default_rng([seed, ("text_encoder", "unet", "vae_decoder", "vae_encoder").index(network)])
    axes = axis_values(dims, batch, resolution, resolution)
    inputs, _ = network_io(network, dims, "fp32")
    feeds = {}
    for spec in inputs:
        shape = concrete_shape(spec, axes)
        if spec.name == "input_ids":
            ids = np.full(shape, EOS, dtype=np.int32)
            ids[:, 0] = BOS
            ids[:, 1:12] = rng.integers(0, BOS, size=(shape[0], 11), dtype=np.int32)
            feeds[spec.name] = ids
        elif spec.name == "timestep":
            feeds[spec.name] = np.full(shape, 500.0, dtype=np.float32)
        elif spec.name == "image":
            feeds[spec.name] = rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
        else:
            feeds[spec.name] = rng.standard_normal(size=shape, dtype=np.float32)
    return feeds


# -------------------------------------------------------------------------------------- engines


def _engine_networks(task: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    from runtime.folder.manifest import load_manifest

    engine_dir = Path(task["engine_dir"])
    manifest = load_manifest(engine_dir)
    module = importlib.import_module(f"runtime.engines.{task['backend']}")
    results: dict[str, Any] = {}
    outputs: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {}
    for network in task["networks"]:
        b = network_batch(network, task["batch"], task["guidance_scale"] > 1)
        feeds = network_feeds(network, manifest.dims, b, task["resolution"], task["seed"])
        if manifest.precision == "fp16":
            feeds = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
        t0 = time.perf_counter()
        engine = module.open_engine(engine_dir, manifest, network, **task["options"])
        load_s = time.perf_counter() - t0
        # the first call compiles / allocates: timed separately from the warm calls
        out, results[network] = time_network(lambda: engine.run(feeds), feeds, task, batch=b, load_s=load_s)
        for name, value in out.items():
            outputs[f"{network}/{name}"] = np.asarray(value, dtype=np.float32)
        for attr in ("inference_precision", "threads", "providers"):
            if hasattr(engine, attr):
                info.setdefault(attr, getattr(engine, attr))
        del engine
        gc.collect()
    return results, outputs, info


def _engine_e2e(task: dict[str, Any]) -> dict[str, Any]:
    """Our pipeline end to end. With `cache_interval` > 1 (step caching) every timed cached run is
    paired with an uncached run in the same process, alternating, so the speed-up compares runs made
    under the same machine conditions (a shared VM's speed drifts by a third between processes)."""
    import runtime

    t0 = time.perf_counter()
    pipe = runtime.load(task["engine_dir"], backend=task["backend"], **task["options"])
    load_s = time.perf_counter() - t0
    res, steps = task["resolution"], task["steps"]
    interval = task.get("cache_interval", 1)

    def run(n: int, every: int):
        return pipe.txt2img(PROMPT, negative_prompt="", height=res, width=res, num_inference_steps=n,
                            guidance_scale=task["guidance_scale"], seed=task["seed"], output_type="np",
                            progress=False, cache_interval=every)

    for _ in range(task["e2e_warmup"]):  # warm-up at 2 steps compiles every shape the timed runs use
        run(min(2, steps), interval)
    timed: dict[int, dict[str, list]] = {k: {"times": [], "cpu": [], "stages": []} for k in {1, interval}}
    last: dict[int, Any] = {}
    for _ in range(task["e2e_repeats"]):
        for every in sorted(timed):  # uncached first, then cached
            c0, t0 = time.process_time(), time.perf_counter()
            last[every] = run(steps, every)
            timed[every]["times"].append(time.perf_counter() - t0)
            timed[every]["cpu"].append(time.process_time() - c0)
            timed[every]["stages"].append(dict(last[every].timings))
    result, own = last[interval], timed[interval]
    save_image(task, result.images)
    stats = summarize(own["times"], warmup=task["e2e_warmup"], cpu_times=own["cpu"])
    stats.update(load_s=load_s, backend=pipe.backend, backend_reason=pipe.backend_reason, steps=steps,
                 cache_interval=interval, stage_timings=own["stages"],
                 sampler=result.parameters.get("scheduler", pipe.default_scheduler))
    if interval > 1:
        paired = timed[1]
        stats["paired_uncached"] = {**summarize(paired["times"], warmup=task["e2e_warmup"], cpu_times=paired["cpu"]),
                                    "stage_timings": paired["stages"]}
        save_image(task, last[1].images, "paired_image_path")
    return stats


# ---------------------------------------------------------------------------------------- peers


def _load_peer(task: dict[str, Any]):
    import torch
    from diffusers import StableDiffusionPipeline

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[task["dtype"]]
    pipe = StableDiffusionPipeline.from_pretrained(task["diffusers_dir"], torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    device = task.get("device", "cpu")
    pipe.to(device)
    if task.get("compile"):
        pipe.unet = torch.compile(pipe.unet)
    return pipe, dtype, device


def _peer_networks(task: dict[str, Any], pipe, dtype, device) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    import torch

    dims = ModelDims(latent_channels=pipe.vae.config.latent_channels, unet_in_channels=pipe.unet.config.in_channels,
                     vae_scale_factor=pipe.vae_scale_factor, text_hidden_size=pipe.text_encoder.config.hidden_size)
    sf = pipe.vae.config.scaling_factor
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def t(a: np.ndarray):
        x = torch.from_numpy(a).to(device)
        return x.to(dtype) if x.is_floating_point() else x.long()

    calls = {
        "text_encoder": lambda f: {"last_hidden_state": pipe.text_encoder(t(f["input_ids"]), return_dict=False)[0]},
        "unet": lambda f: {"noise_pred": pipe.unet(t(f["sample"]), t(f["timestep"]), t(f["encoder_hidden_states"]),
                                                   return_dict=False)[0]},
        "vae_decoder": lambda f: {"image": pipe.vae.decode(t(f["latent"]) / sf, return_dict=False)[0]},
        "vae_encoder": lambda f: (lambda d: {"latent_mean": d.mean, "latent_std": d.std})(
            pipe.vae.encode(t(f["image"]), return_dict=False)[0]),
    }
    results: dict[str, Any] = {}
    outputs: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for network in task["networks"]:
            b = network_batch(network, task["batch"], task["guidance_scale"] > 1)
            feeds = network_feeds(network, dims, b, task["resolution"], task["seed"])

            def call():
                out = calls[network](feeds)
                sync()
                return out

            out, results[network] = time_network(call, feeds, task, batch=b)
            for name, value in out.items():
                outputs[f"{network}/{name}"] = value.float().cpu().numpy()
    return results, outputs


def _peer_e2e(task: dict[str, Any], pipe, device) -> dict[str, Any]:
    import torch

    res = task["resolution"]

    # the suite's initial noise, shared with the benchmarks/peers targets (image PSNR between them)
    latents = torch.from_numpy(np.load(task["latents_path"])) if task.get("latents_path") else None

    def run(n: int):
        g = torch.Generator("cpu").manual_seed(task["seed"])
        out = pipe(PROMPT, negative_prompt="", height=res, width=res, num_inference_steps=n,
                   guidance_scale=task["guidance_scale"], generator=g, output_type="np",
                   latents=None if latents is None else latents.to(device, pipe.unet.dtype))
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.inference_mode():
        out, stats = time_e2e(run, task)
    save_image(task, out.images)
    stats.update(sampler=type(pipe.scheduler).__name__)
    return stats


# -------------------------------------------------------------------------------------- prepare


def save_random(diffusers_dir: Path, model_name: str, seed: int) -> float:
    """Write preset `model_name`'s random weights (seed `seed`) as the diffusers folder `diffusers_dir`
    unless it is there; the seconds spent (0.0: reused). Assembled beside it, then renamed into place."""
    from export.loading.read import random_model
    from export.loading.save import save_diffusers

    if (diffusers_dir / "model_index.json").is_file():
        return 0.0
    t0 = time.perf_counter()
    tmp = diffusers_dir.with_name(diffusers_dir.name + ".partial")
    model = random_model(model_name, seed=seed)
    save_diffusers(model, tmp)
    del model
    gc.collect()
    tmp.replace(diffusers_dir)
    return time.perf_counter() - t0


def prepare(task: dict[str, Any]) -> dict[str, Any]:
    """Make the diffusers folder (random preset weights) and the engine folder built from it."""
    from export.build import build_engine

    diffusers_dir, engine_dir = Path(task["diffusers_dir"]), Path(task["engine_dir"])
    info: dict[str, Any] = {}
    seconds = save_random(diffusers_dir, task["model"], task["weights_seed"])
    if seconds:
        info["diffusers_s"] = seconds
    t0 = time.perf_counter()
    build_engine(str(diffusers_dir), engine_dir, **task["build_options"])
    info["engine_s"] = time.perf_counter() - t0
    return info


def single_file(task: dict[str, Any]) -> dict[str, Any]:
    """Save the diffusers folder's weights as one original-layout `.safetensors` checkpoint (the
    sdcpp peer's input, benchmarks/peers/sdcpp_worker.py), atomically."""
    from export.loading.read import load_model
    from export.loading.save import save_single_file

    t0 = time.perf_counter()
    path = save_single_file(load_model(task["diffusers_dir"]), task["single_file"])
    return {"single_file_s": time.perf_counter() - t0, "bytes": path.stat().st_size}


# ----------------------------------------------------------------------------------------- main


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"target": task.get("target"), "status": "ok"}
    t0 = time.perf_counter()
    if task["kind"] == "prepare":
        result["prepare"] = prepare(task)
    elif task["kind"] == "choose":  # the backend runtime.load picks here (its calibration)
        from runtime.engines import choose_backend
        from runtime.folder.manifest import load_manifest

        backend, reason = choose_backend(task["engine_dir"], load_manifest(task["engine_dir"]), None, calibrate=True)
        result["choice"] = {"backend": backend, "reason": reason}
    elif task["kind"] == "single_file":
        result["prepare"] = single_file(task)
    elif task["kind"] == "engine":
        if task["networks"]:
            networks, outputs, info = _engine_networks(task)
            result.update(networks=networks, info=info)
            save_outputs(task, outputs)
        if task["e2e"]:
            result["e2e"] = _engine_e2e(task)
    elif task["kind"] == "peer":
        pipe, dtype, device = _load_peer(task)
        result["load_s"] = time.perf_counter() - t0
        result["info"] = {"dtype": task["dtype"], "device": device, "torch_threads": _torch_threads()}
        if task["networks"]:
            networks, outputs = _peer_networks(task, pipe, dtype, device)
            result["networks"] = networks
            save_outputs(task, outputs)
        if task["e2e"]:
            result["e2e"] = _peer_e2e(task, pipe, device)
    else:
        raise ValueError(f"unknown task kind {task['kind']!r}")
    return finish(result, t0)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    return serve(run_task, "benchmarks.worker", argv)


if __name__ == "__main__":
    sys.exit(main())
