"""A folder's recommended generation settings (issue 25): what a few-step model runs with when the
caller gives no steps, guidance or sampler, so `sd-generate FOLDER "prompt"` on an LCM or Turbo
folder is fast and right without flags. Explicit values always win.

`build-engine` records them in the manifest's "defaults" ({"steps", "guidance_scale", "sampler"},
each optional): its `--default-steps`, `--default-guidance`, `--default-sampler`, else what the
source's scheduler config implies (`recommended`):
- `LCMScheduler` with an LCM-distilled U-Net (it embeds the guidance scale: `time_cond_proj_dim`):
  the lcm sampler, 4 steps, guidance 8.5, diffusers 0.42 `LatentConsistencyModelPipeline.__call__`'s
  defaults (num_inference_steps=4, guidance_scale=8.5);
- `LCMScheduler` with a plain U-Net (an LCM-LoRA merged at build, `--lora`): the lcm sampler, 4
  steps, guidance 1.0: issue 25's "guidance 1-2" for LCM-LoRA at its lowest, where no guidance batch
  runs (`guidance_scale <= 1`), so each step is one U-Net call;
- an Euler scheduler with `timestep_spacing` "trailing" (what SD-Turbo / SDXL-Turbo (ADD),
  SDXL-Lightning and Hyper-SD ship, Table 2 of arXiv:2305.08891): 1 step at guidance 0, the SD-Turbo
  model card's `pipe(prompt, num_inference_steps=1, guidance_scale=0.0)`; its sampler stays the
  config's. A 2-, 4- or 8-step distillation says so with `--default-steps`.
Other folders recommend nothing: the API's own defaults apply (Python 50 steps at 7.5, A1111's wire
50 at 7.0, the sampler of the folder's scheduler config).
"""

from __future__ import annotations

import math
from typing import Any

from runtime.scheduler import REGISTRY, SchedulerError, default_sampler

__all__ = ["KEYS", "LCM_DEFAULTS", "LCM_LORA_DEFAULTS", "TURBO_DEFAULTS", "check_defaults", "recommended"]

KEYS = ("steps", "guidance_scale", "sampler")
# diffusers 0.42 pipelines/latent_consistency_models/pipeline_latent_consistency_text2img.py `__call__`
LCM_DEFAULTS = {"sampler": "lcm", "steps": 4, "guidance_scale": 8.5}
# LCM-LoRA on a plain U-Net: guidance 1-2 (issue 25), at 1.0 without a guidance batch
LCM_LORA_DEFAULTS = {"sampler": "lcm", "steps": 4, "guidance_scale": 1.0}
# stabilityai/sd-turbo and sdxl-turbo model cards: num_inference_steps=1, guidance_scale=0.0
TURBO_DEFAULTS = {"steps": 1, "guidance_scale": 0.0}
_TRAILING_CLASSES = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")


def recommended(config: dict[str, Any] | None, embeds_guidance: bool = False) -> dict[str, Any]:
    """The settings a diffusers scheduler config implies (see the module doc) for a U-Net that embeds
    the guidance scale (LCM-distilled) or not; {} for none."""
    cls = str((config or {}).get("_class_name", ""))
    if cls == "LCMScheduler":
        return dict(LCM_DEFAULTS if embeds_guidance else LCM_LORA_DEFAULTS)
    if cls in _TRAILING_CLASSES and (config or {}).get("timestep_spacing") == "trailing":
        return {"sampler": default_sampler(config), **TURBO_DEFAULTS}
    return {}


def check_defaults(value: Any) -> dict[str, Any]:
    """A "defaults" object validated: known keys only, steps an integer >= 1, guidance_scale a finite
    number >= 0, sampler one of ours. Raises SchedulerError naming the first problem."""
    if not isinstance(value, dict):
        raise SchedulerError(f"defaults must be an object with keys among {', '.join(KEYS)}; got {value!r}")
    unknown = sorted(set(value) - set(KEYS))
    if unknown:
        raise SchedulerError(f"unknown defaults keys {unknown}; expected some of {', '.join(KEYS)}")
    steps, scale, sampler = (value.get(k) for k in KEYS)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 10000):
        raise SchedulerError(f"defaults.steps must be an integer in [1, 10000]; got {steps!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or
                              not math.isfinite(scale) or scale < 0):
        raise SchedulerError(f"defaults.guidance_scale must be a finite number >= 0; got {scale!r}")
    if sampler is not None and sampler not in REGISTRY:
        raise SchedulerError(f"defaults.sampler {sampler!r} is not one of ours ({', '.join(REGISTRY)})")
    return {k: (float(v) if k == "guidance_scale" else v) for k, v in value.items() if v is not None}
