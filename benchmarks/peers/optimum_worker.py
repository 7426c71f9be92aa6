"""The optimum-intel peer, run with the optimum venv's Python (benchmarks/peers/setup-optimum.sh):
`.venv-optimum/bin/python -m benchmarks.peers.optimum_worker TASK.json RESULT.json`.

Task kinds:
  prepare  export the diffusers folder to OpenVINO IR with optimum
           (`OVStableDiffusionPipeline.from_pretrained(diffusers_dir, export=True)`, optimum's default
           export settings) and `save_pretrained` it to `ov_dir`, atomically (a temporary folder renamed
           on success). Done once per cache; its time and peak RSS are recorded, not benchmarked.
  fewstep_prepare, fewstep
           the few-step scenarios (benchmarks/peers/optimum_fewstep.py).
  sdxl_prepare, sdxl
           the SDXL benchmark (benchmarks/peers/optimum_sdxl.py).
  peer     load `ov_dir`, static-reshape to the benchmarked size (batch 1, one image per prompt),
           compile, then time per-network calls (`feeds_path`) and/or txt2img end to end.

`precision` "default" leaves OpenVINO's CPU plugin to choose (bf16 where the CPU has it, as a user of
optimum gets); "f32" passes INFERENCE_PRECISION_HINT=f32. Imports only numpy, torch, optimum and
benchmarks.protocol (the standard library), never runtime/ or export/.
"""

from __future__ import annotations

import gc
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.protocol import finish, save_image, save_outputs, serve, time_e2e, time_network, versions

PACKAGES = ("optimum-intel", "optimum", "openvino", "diffusers", "transformers", "torch", "numpy")
# Per-network calls at the shapes the static reshape compiles: the U-Net at the guidance batch
# (2 x batch), the VAE at the image batch. The text encoder is reshaped to batch 1 (the pipeline
# encodes the prompt and the negative prompt in two calls), so it is not timed at the suite's batch 2.
NETWORKS = ("unet", "vae_decoder", "vae_encoder")
COMPILED_PROPERTIES = ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS")


def ov_config(precision: str) -> dict[str, str]:
    """OpenVINO compile options for `precision`: "default" (the plugin's choice) or "f32"."""
    if precision == "default":
        return {}
    if precision == "f32":
        return {"INFERENCE_PRECISION_HINT": "f32"}
    raise ValueError(f"optimum peer precision must be 'default' or 'f32', got {precision!r}")


def prepare(task: dict[str, Any]) -> dict[str, Any]:
    """Export `diffusers_dir` to OpenVINO IR in `ov_dir` (skipped when it is already there)."""
    from optimum.intel import OVStableDiffusionPipeline

    ov_dir = Path(task["ov_dir"])
    if (ov_dir / "model_index.json").is_file():
        return {"reused": True}
    partial = ov_dir.with_name(ov_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    t0 = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(task["diffusers_dir"], export=True, compile=False,
                                                     local_files_only=True)
    export_s = time.perf_counter() - t0
    pipe.save_pretrained(partial)
    del pipe
    gc.collect()
    partial.replace(ov_dir)
    size = sum(p.stat().st_size for p in ov_dir.rglob("*") if p.is_file())
    return {"reused": False, "export_s": export_s, "save_s": time.perf_counter() - t0 - export_s,
            "ov_dir_bytes": size}


def load(task: dict[str, Any]):
    """The pipeline from `ov_dir`, static-reshaped to the task's size and compiled: (pipe, load_s, info)."""
    from optimum.intel import OVStableDiffusionPipeline

    res = task["resolution"]
    t0 = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(task["ov_dir"], compile=False, local_files_only=True,
                                                     ov_config=ov_config(task["precision"]))
    pipe.reshape(batch_size=task["batch"], height=res, width=res, num_images_per_prompt=1)
    pipe.compile()
    load_s = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    request = pipe.unet.request
    info = {"precision": task["precision"], "scheduler": type(pipe.scheduler).__name__,
            "scheduler_config": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
            "unet_compiled": {p: str(request.get_property(p)) for p in COMPILED_PROPERTIES},
            "unet_inputs": {i.get_any_name(): [str(i.get_element_type()), str(i.get_partial_shape())]
                            for i in pipe.unet.model.inputs},
            "versions": versions(PACKAGES)}
    return pipe, load_s, info


def _network_call(pipe, network: str, feeds: dict[str, np.ndarray], scaling_factor: float):
    """A function that runs `network` once through optimum's component wrappers (as the pipeline
    does) and returns outputs named as in runtime/folder/networks.py, float32 NumPy."""
    import torch

    def f32(a: np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    if network == "unet":
        # static reshape makes the timestep input [1]: the pipeline passes one timestep per step
        sample, hidden = f32(feeds["sample"]), f32(feeds["encoder_hidden_states"])
        timestep = torch.from_numpy(feeds["timestep"][:1].astype(np.int64))
        return lambda: {"noise_pred": np.asarray(pipe.unet(sample, timestep, hidden)[0], np.float32)}
    if network == "vae_decoder":
        latent = f32(feeds["latent"] / scaling_factor)  # the graph takes unscaled latents, as diffusers' decode
        return lambda: {"image": np.asarray(pipe.vae_decoder(latent_sample=latent)[0], np.float32)}
    if network == "vae_encoder":
        image = f32(feeds["image"])

        def encode():
            dist = pipe.vae_encoder(sample=image)[0]  # diffusers' DiagonalGaussianDistribution (logvar clamped)
            return {"latent_mean": np.asarray(dist.mean, np.float32), "latent_std": np.asarray(dist.std, np.float32)}

        return encode
    raise ValueError(f"the optimum peer times {', '.join(NETWORKS)}, not {network!r}")


def networks(task: dict[str, Any], pipe) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
    """Time each asked network the suite gave feeds for; (stats, outputs for parity, skipped)."""
    with np.load(task["feeds_path"]) as data:
        all_feeds = {k: data[k] for k in data.files}
    sf = float(pipe.vae_decoder.config.get("scaling_factor", 0.18215))
    results: dict[str, Any] = {}
    outputs: dict[str, np.ndarray] = {}
    skipped = [n for n in task["networks"] if n not in NETWORKS]
    for network in (n for n in task["networks"] if n in NETWORKS):
        feeds = {k.split("/", 1)[1]: v for k, v in all_feeds.items() if k.split("/", 1)[0] == network}
        call = _network_call(pipe, network, feeds, sf)
        out, results[network] = time_network(call, feeds, task, batch=int(next(iter(feeds.values())).shape[0]))
        outputs.update({f"{network}/{name}": value for name, value in out.items()})
    return results, outputs, skipped


def e2e(task: dict[str, Any], pipe) -> dict[str, Any]:
    """txt2img from the suite's latents: one 2-step warm-up, then `e2e_repeats` timed runs."""
    import torch

    res = task["resolution"]
    latents = torch.from_numpy(np.load(task["latents_path"]))

    def run(n: int):
        return pipe(task["prompt"], negative_prompt="", height=res, width=res, num_inference_steps=n,
                    guidance_scale=task["guidance_scale"], latents=latents.clone(), output_type="np")

    out, stats = time_e2e(run, task)
    save_image(task, out.images)
    stats.update(sampler=type(pipe.scheduler).__name__)
    return stats


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"target": task.get("target"), "status": "ok"}
    t0 = time.perf_counter()
    if task["kind"] == "prepare":
        result["prepare"] = prepare(task)
    elif task["kind"] in ("fewstep_prepare", "fewstep"):  # benchmarks/fewstep.py (python -m benchmarks --fewstep)
        from benchmarks.peers import optimum_fewstep

        if task["kind"] == "fewstep_prepare":
            result["prepare"] = optimum_fewstep.prepare(task)
        else:
            result.update(optimum_fewstep.run(task, ov_config(task["precision"])))
            result["info"]["versions"] = versions(PACKAGES)
    elif task["kind"] in ("sdxl_prepare", "sdxl"):  # benchmarks/sdxl.py (python -m benchmarks sdxl)
        from benchmarks.peers import optimum_sdxl

        if task["kind"] == "sdxl_prepare":
            result["prepare"] = optimum_sdxl.prepare(task)
        else:
            result.update(optimum_sdxl.run(task, ov_config(task["precision"])))
            result["info"]["versions"] = versions(PACKAGES)
    elif task["kind"] == "peer":
        pipe, result["load_s"], result["info"] = load(task)
        if task["networks"]:
            result["networks"], outputs, skipped = networks(task, pipe)
            if skipped:
                result["info"]["networks_not_timed"] = skipped
            save_outputs(task, outputs)
        if task["e2e"]:
            result["e2e"] = e2e(task, pipe)
    else:
        raise ValueError(f"unknown task kind {task['kind']!r} for the optimum peer")
    return finish(result, t0)


def main(argv: list[str] | None = None) -> int:
    return serve(run_task, "benchmarks.peers.optimum_worker", argv)


if __name__ == "__main__":
    sys.exit(main())
