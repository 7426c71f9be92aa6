"""The few-step benchmark's model folders (benchmarks/fewstep.py), made once under the cache dir.

Full-size SD 1.5 architecture, random weights, four diffusers folders:

  turbo-full  random_model("sd15", seed) with SD-Turbo's scheduler: EulerDiscreteScheduler, trailing
              timesteps (stabilityai/sd-turbo scheduler/scheduler_config.json), run at 1 step, guidance 0
  lcm-full    the same text encoder and VAE with an LCM-distilled U-Net: diffusers' own
              UNet2DConditionModel at SD 1.5's config plus `time_cond_proj_dim` 256 (as
              SimianLuo/LCM_Dreamshaper_v7 unet/config.json), random weights; LCMScheduler
              (that repository's scheduler config); model_index LatentConsistencyModelPipeline
  turbo-tiny, lcm-tiny
              the same folders with vae/ a full-size AutoencoderTiny: diffusers' `AutoencoderTiny()`
              defaults, which are madebyollin/taesd's config (export/tiny_vae.py), random weights

The tiny folders hard-link their other components' files to the full folder's (no copies of the
3.4 GB U-Net). Each folder is assembled beside its final path and renamed into place, so an
interrupted build leaves nothing half-written. Needs torch and diffusers (run in a child process:
benchmarks/worker.py task kind "fewstep_prepare").
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path
from typing import Any

from benchmarks.protocol import link_tree

# stabilityai/sd-turbo scheduler/scheduler_config.json (EulerDiscreteScheduler, trailing spacing)
TURBO_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
                   "prediction_type": "epsilon", "timestep_spacing": "trailing", "interpolation_type": "linear",
                   "use_karras_sigmas": False, "clip_sample": False, "set_alpha_to_one": False,
                   "trained_betas": None}
# SimianLuo/LCM_Dreamshaper_v7 scheduler/scheduler_config.json (LCMScheduler)
LCM_SCHEDULER = {"_class_name": "LCMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
                 "prediction_type": "epsilon", "original_inference_steps": 50, "clip_sample": False,
                 "set_alpha_to_one": True, "timestep_spacing": "leading", "timestep_scaling": 10.0,
                 "trained_betas": None}
LCM_COND_DIM = 256  # SimianLuo/LCM_Dreamshaper_v7 unet/config.json time_cond_proj_dim
FOLDERS = ("turbo-full", "turbo-tiny", "lcm-full", "lcm-tiny")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _in_place(final: Path, make) -> float:
    """Run `make(stage)` on a fresh sibling folder and rename it to `final`; skip when `final` has
    its model_index.json. Returns the seconds spent (0 when reused)."""
    import time

    if (final / "model_index.json").is_file():
        return 0.0
    stage = final.with_name(f".{final.name}.partial")
    shutil.rmtree(stage, ignore_errors=True)
    t0 = time.perf_counter()
    make(stage)
    if final.exists():
        shutil.rmtree(final)
    stage.rename(final)
    return time.perf_counter() - t0


def _turbo(stage: Path, model_name: str, seed: int) -> None:
    from export.loading.read import random_model
    from export.loading.save import save_diffusers

    model = random_model(model_name, seed=seed)
    save_diffusers(model, stage)
    del model
    gc.collect()
    _write_json(stage / "scheduler" / "scheduler_config.json", {**TURBO_SCHEDULER, "_diffusers_version": "0.24.0"})
    index = json.loads((stage / "model_index.json").read_text())
    _write_json(stage / "model_index.json", {**index, "scheduler": ["diffusers", TURBO_SCHEDULER["_class_name"]]})


def _lcm(stage: Path, turbo: Path, model_name: str, seed: int) -> None:
    import diffusers
    import torch

    from export.configs import preset

    link_tree(turbo, stage, skip=("unet", "scheduler", "model_index.json"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        unet = diffusers.UNet2DConditionModel.from_config({**preset(model_name).unet.to_dict(),
                                                           "time_cond_proj_dim": LCM_COND_DIM})
    unet.save_pretrained(str(stage / "unet"))
    del unet
    gc.collect()
    _write_json(stage / "scheduler" / "scheduler_config.json", {**LCM_SCHEDULER, "_diffusers_version": "0.22.0"})
    index = json.loads((turbo / "model_index.json").read_text())
    _write_json(stage / "model_index.json", {**index, "_class_name": "LatentConsistencyModelPipeline",
                                             "scheduler": ["diffusers", "LCMScheduler"]})


def _tiny(stage: Path, full: Path, seed: int) -> None:
    import diffusers
    import torch

    link_tree(full, stage, skip=("vae", "model_index.json"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        vae = diffusers.AutoencoderTiny()  # madebyollin/taesd's config: diffusers' defaults
    vae.save_pretrained(str(stage / "vae"))
    index = json.loads((full / "model_index.json").read_text())
    _write_json(stage / "model_index.json", {**index, "vae": ["diffusers", "AutoencoderTiny"]})


def make_folders(root: Path, model_name: str = "sd15", seed: int = 0) -> dict[str, float]:
    """The four diffusers folders of preset `model_name` under `root` (FOLDERS), made where missing;
    seconds per folder made (0: reused)."""
    root.mkdir(parents=True, exist_ok=True)
    turbo, lcm = root / "turbo-full", root / "lcm-full"
    return {"turbo-full": _in_place(turbo, lambda s: _turbo(s, model_name, seed)),
            "lcm-full": _in_place(lcm, lambda s: _lcm(s, turbo, model_name, seed)),
            "turbo-tiny": _in_place(root / "turbo-tiny", lambda s: _tiny(s, turbo, seed)),
            "lcm-tiny": _in_place(root / "lcm-tiny", lambda s: _tiny(s, lcm, seed))}
