"""ControlNet cost (issue 27): full-size SD 1.5 and a full-size ControlNet (random weights) at 512 x 512.

    python -m benchmarks controlnet [--model sd15|tiny-sd1] [--resolution 512] [--steps 20] [--repeats 3]
                                    [--backend openvino|onnxruntime|...] [--no-diffusers] [--out FILE.json]

Measured, each target in a fresh process (benchmarks/protocol.py workers) so its peak RSS is its own:
  - ours: per network at the guidance batch (2 images' worth: [uncond, cond]) the ControlNet call,
    the residual U-Net call (unet_control) and the plain U-Net call (median of `repeats` after a
    warm-up, with min and max); end to end txt2img at `steps` steps, guidance 7.5, with and without a
    control image (alternating, `repeats` each, after a warm-up of each);
  - diffusers fp32 (the reference peer): StableDiffusionPipeline and StableDiffusionControlNetPipeline
    over the same weights, end to end the same way;
and for each: the ratio ControlNet image / plain image end to end (goal: <= 1.5x on our default
engine; diffusers pays about 1.4-1.5x). Weights: export/configs.py's preset (seed 0) as a diffusers
folder, and a ControlNet made by diffusers' ControlNetModel.from_unet (its zero-initialised output
convolutions given random weights, seed 1), both cached under --cache-dir with the engine folder
(build-engine --controlnet).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import machine as mach
from benchmarks.protocol import finish, serve, time_network, versions
from benchmarks.timing import summarize

PROMPT = "a lighthouse on a cliff at dusk, detailed, watercolor"
GUIDANCE_SCALE = 7.5  # diffusers' default
CONTROLNET = "control"  # the ControlNet's name in the engine folder
GOAL_RATIO = 1.5  # issue 27: the ControlNet image costs at most 1.5x the plain image end to end
DEFAULT_CACHE = Path("~/.cache/sd-runtime/benchmarks").expanduser()


def control_image(size: int) -> np.ndarray:
    """An edge-map-like control image (white lines on black), uint8 [size, size, 3]."""
    rng = np.random.default_rng(0)
    m = np.zeros((size, size), np.uint8)
    for _ in range(24):
        m[rng.integers(0, size), :] = 255
        m[:, rng.integers(0, size)] = 255
    return np.repeat(m[:, :, None], 3, axis=2)


def prepare(model: str, cache_dir: Path, resolution: int) -> dict[str, str]:
    """The cached diffusers folder, ControlNet folder and engine folder for `model`."""
    import torch
    import diffusers

    from export.build import build_engine
    from export.configs import preset
    from export.loading.read import random_model
    from export.loading.save import save_diffusers

    root = cache_dir / f"controlnet-{model}"
    folder, cn = root / "diffusers", root / "controlnet"
    if not (folder / "model_index.json").is_file():
        save_diffusers(random_model(model, seed=0), folder)
    if not (cn / "config.json").is_file():
        unet = diffusers.UNet2DConditionModel.from_pretrained(str(folder / "unet"))
        torch.manual_seed(1)
        levels = int(np.log2(preset(model).vae_scale_factor))  # the embedding downsamples as the VAE does
        embedding = (16, 32, 96, 256)[: levels + 1]  # diffusers' default for SD's x8
        net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding)
        with torch.no_grad():
            for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
                conv.weight.normal_(0.0, 0.02)
                conv.bias.normal_(0.0, 0.02)
        net.save_pretrained(str(cn))
    engine = build_engine(folder, root / f"engine-{resolution}", controlnets=[f"{cn}:{CONTROLNET}"],
                          opt_image=resolution, min_image=resolution, max_image=resolution, max_batch=1)
    return {"folder": str(folder), "controlnet": str(cn), "engine": str(engine)}


# --- workers (one per target, in their own processes) ---------------------------------------------------

def _ours(task: dict[str, Any]) -> dict[str, Any]:
    import runtime

    t0 = time.perf_counter()
    size, image = task["resolution"], control_image(task["resolution"])
    with runtime.load(task["engine"], backend=task.get("backend")) as pipe:
        networks = _network_times(pipe, task)
        e2e = _alternate(lambda control, n: pipe.txt2img(
            PROMPT, num_inference_steps=n, guidance_scale=GUIDANCE_SCALE, seed=1, height=size, width=size,
            output_type="np", progress=False, **({"control_image": image} if control else {})), task)
        backend = pipe.backend
    return finish({"target": "ours", "status": "ok", "backend": backend, "networks": networks, "e2e": e2e}, t0)


def _network_times(pipe: Any, task: dict[str, Any]) -> dict[str, Any]:
    """ControlNet, unet_control and unet calls at the guidance batch, on the same seeded inputs."""
    from runtime.folder.networks import control_residual_specs, controlnet_network

    dims, size = pipe.manifest.dims, task["resolution"]
    rng = np.random.default_rng(0)
    lat = size // dims.vae_scale_factor
    base = {"sample": rng.standard_normal((2, 4, lat, lat), dtype=np.float32),
            "timestep": np.full((2,), 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, dims.text_hidden_size), dtype=np.float32)}
    names = [t.name for t in control_residual_specs(dims)]
    cn_feeds = {**base, "controlnet_cond": np.repeat(control_image(size).transpose(2, 0, 1)[None], 2, 0) / 255.0,
                "conditioning_scale": np.ones((2, len(names)), np.float32)}
    cn = pipe.engine(controlnet_network(CONTROLNET))
    residuals, stats = time_network(lambda: cn.run(cn_feeds), cn_feeds, task, batch=2)
    out = {"controlnet": stats}
    control_feeds = {**base, **{k: residuals[k] for k in names}}
    unet_control = pipe.engine("unet_control")
    out["unet_control"] = time_network(lambda: unet_control.run(control_feeds), control_feeds, task, batch=2)[1]
    out["unet"] = time_network(lambda: pipe.engine("unet").run(base), base, task, batch=2)[1]
    return out


def _alternate(run: Any, task: dict[str, Any]) -> dict[str, Any]:
    """End to end without and with control, alternating (a shared machine's load drifts alike over
    both), after one warm-up run of each at 2 steps; the ratio of the medians."""
    for control in (False, True):
        run(control, min(2, task["steps"]))
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(task["repeats"]):
        for control in (False, True):
            t0 = time.perf_counter()
            run(control, task["steps"])
            times[control].append(time.perf_counter() - t0)
    plain, control = summarize(times[False], warmup=1), summarize(times[True], warmup=1)
    return {"plain": plain, "controlnet": control, "ratio": control["median_s"] / plain["median_s"],
            "steps": task["steps"]}


def _diffusers(task: dict[str, Any]) -> dict[str, Any]:
    import diffusers
    import torch

    t0 = time.perf_counter()
    size = task["resolution"]
    image = control_image(size)
    from PIL import Image

    kwargs = dict(safety_checker=None, requires_safety_checker=False, feature_extractor=None, local_files_only=True,
                  dtype=torch.float32)
    net = diffusers.ControlNetModel.from_pretrained(task["controlnet"])
    cpipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(task["folder"], controlnet=net, **kwargs)
    plain = diffusers.StableDiffusionPipeline(**{k: v for k, v in cpipe.components.items() if k != "controlnet"},
                                              requires_safety_checker=False)
    for p in (cpipe, plain):
        p.set_progress_bar_config(disable=True)

    def run(control: bool, n: int) -> Any:
        common = dict(num_inference_steps=n, guidance_scale=GUIDANCE_SCALE, height=size, width=size, output_type="np",
                      generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            return (cpipe(PROMPT, image=Image.fromarray(image), **common) if control else plain(PROMPT, **common))

    e2e = _alternate(run, task)
    return finish({"target": "diffusers-fp32", "status": "ok", "e2e": e2e,
                   "versions": versions(("torch", "diffusers"))}, t0)


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    return _ours(task) if task["target"] == "ours" else _diffusers(task)


# --- driver -------------------------------------------------------------------------------------------------

def _worker(task: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sdrt-cn-bench-") as tmp:
        task_path, result_path = Path(tmp) / "task.json", Path(tmp) / "result.json"
        task_path.write_text(json.dumps(task))
        subprocess.run([sys.executable, "-m", "benchmarks.controlnet", "worker", str(task_path), str(result_path)],
                       check=False)
        return json.loads(result_path.read_text()) if result_path.is_file() else \
            {"target": task["target"], "status": "failed", "reason": "the worker wrote no result"}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["worker"]:
        return serve(run_task, "benchmarks.controlnet", args[1:])
    p = argparse.ArgumentParser(prog="python -m benchmarks controlnet", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15", help="export/configs.py preset (default sd15; tiny-sd1 to try it)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each kind (per network and end to end)")
    p.add_argument("--warmup", type=int, default=1, help="untimed network calls before the timed ones")
    p.add_argument("--backend", default=None, help="our engine backend (default: the runtime's choice)")
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers fp32 peer")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=None, help="JSON result (default: print only)")
    a = p.parse_args(args)
    paths = prepare(a.model, a.cache_dir, a.resolution)
    task = {**paths, "model": a.model, "resolution": a.resolution, "steps": a.steps, "repeats": a.repeats,
            "warmup": a.warmup, "backend": a.backend}
    results = [_worker({**task, "target": "ours"})]
    if not a.no_diffusers:
        results.append(_worker({**task, "target": "diffusers-fp32"}))
    report = {"benchmark": "controlnet", "settings": task, "machine": mach.machine(), "goal_ratio": GOAL_RATIO,
              "results": results}
    for r in results:
        if r.get("status") != "ok":
            print(f"{r['target']}: FAILED {r.get('reason')}")
            continue
        e = r["e2e"]
        print(f"{r['target']}: end to end {e['plain']['median_s']:.2f} s plain, {e['controlnet']['median_s']:.2f} s "
              f"with ControlNet ({e['ratio']:.2f}x; goal <= {GOAL_RATIO}x), peak RSS {r['peak_rss_mb']:.0f} MiB")
        for name, s in r.get("networks", {}).items():
            print(f"  {name}: {s['median_s'] * 1000:.1f} ms (min {s['min_s'] * 1000:.1f}, max {s['max_s'] * 1000:.1f})")
    if a.out:
        a.out.write_text(json.dumps(report, indent=1, default=str))
    return 0 if all(r.get("status") == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
