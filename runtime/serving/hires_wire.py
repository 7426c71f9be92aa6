"""A1111's hires-fix fields of POST /sdapi/v1/txt2img mapped onto `txt2img(hires=HiresFix(...))`
(runtime/hires.py), as A1111 v1.10 reads them (modules/processing.py
StableDiffusionProcessingTxt2Img: `__post_init__`, `init`, `calculate_target_resolution`,
`sample_hr_pass`).
"""

from __future__ import annotations

from typing import Any

from runtime.hires import HiresFix
from runtime.imaging import upscale as up
from runtime.sampling import names as sampler_names

from .codec import WireError

__all__ = ["FIELDS", "extra_params", "first_pass_size", "hires_fix"]

# the hires fields of the request layer (runtime/hires.py PipelineError.field) under A1111's names
FIELDS = {"hires": "enable_hr", "hires.upscaler": "hr_upscaler", "hires.scale": "hr_scale",
          "hires.steps": "hr_second_pass_steps", "hires.strength": "denoising_strength",
          "hires.resize_width": "hr_resize_x", "hires.resize_height": "hr_resize_y",
          "hires.scheduler": "hr_sampler_name", "hires.prompt": "hr_prompt",
          "hires.negative_prompt": "hr_negative_prompt"}
SAME_SCHEDULER = "Use same scheduler"  # A1111's hr_scheduler choice that keeps the first pass's
SAME_CHECKPOINT = "Use same checkpoint"  # A1111's hr_checkpoint_name choice that keeps the model
TXT2IMG_STRENGTH = 0.75  # processing.py StableDiffusionProcessingTxt2Img.denoising_strength default


def first_pass_size(req: Any, size: tuple[int, int], *, img2img: bool) -> tuple[int, int]:
    """(width, height) of the first pass. A1111 __post_init__: non-zero firstphase_width/height
    become the first pass's size (the old hires API; the target then follows hr_scale or
    hr_resize_x/y, as calculate_target_resolution overwrites the old target)."""
    if img2img:
        for field in ("enable_hr", "firstphase_width", "firstphase_height"):
            if getattr(req, field):
                raise WireError(field, "hires fix applies to txt2img only; send the size you want to img2img")
        return size
    if req.firstphase_width == 0 and req.firstphase_height == 0:
        return size
    for field in ("firstphase_width", "firstphase_height"):
        if getattr(req, field) <= 0:
            raise WireError(field, "the old hires API needs both firstphase_width and firstphase_height (or neither: "
                                   "send width / height and hr_scale)")
    return req.firstphase_width, req.firstphase_height


def hires_fix(req: Any) -> HiresFix:
    """The HiresFix of a txt2img request with enable_hr. hr_upscaler None is A1111's
    latent_upscale_default_mode ("Latent"); hr_sampler_name / hr_scheduler None (or "Use same
    scheduler") keep the first pass's; empty hr_prompt / hr_negative_prompt keep the first pass's."""
    if req.hr_checkpoint_name not in (None, "", SAME_CHECKPOINT):
        raise WireError("hr_checkpoint_name", "a second checkpoint for the hires pass is not served here; send null")
    upscaler = "Latent" if req.hr_upscaler is None else req.hr_upscaler
    if upscaler not in up.UPSCALERS:
        raise WireError("hr_upscaler", f"upscaler {upscaler!r} needs weights this server does not have (ESRGAN, "
                                       f"SwinIR, LDSR, ScuNET ...); send one of {', '.join(up.UPSCALERS)}")
    scheduler = karras = None
    hr_schedule = None if req.hr_scheduler in (None, SAME_SCHEDULER) else req.hr_scheduler
    if req.hr_sampler_name or hr_schedule:
        name = req.hr_sampler_name or req.sampler_name or req.sampler_index
        try:
            scheduler, karras = sampler_names.from_a1111(name, hr_schedule or req.scheduler)
        except sampler_names.SamplerNameError as e:
            raise WireError("hr_sampler_name", str(e)) from None
    strength = TXT2IMG_STRENGTH if req.denoising_strength is None else float(req.denoising_strength)
    return HiresFix(scale=float(req.hr_scale), upscaler=upscaler, steps=req.hr_second_pass_steps, strength=strength, resize_width=req.hr_resize_x, resize_height=req.hr_resize_y,
                    scheduler=scheduler, karras=karras, prompt=req.hr_prompt or None,
                    negative_prompt=req.hr_negative_prompt or None)


def extra_params(params: dict[str, Any]) -> dict[str, Any]:
    """A1111's extra_generation_params of a hires request (processing.py init): Hires upscale or
    Hires resize, Hires steps, Hires upscaler, Hires sampler / prompt where they differ."""
    hires = params.get("hires")
    if not hires:
        return {}
    out: dict[str, Any] = {}
    if "scale" in hires:
        out["Hires upscale"] = hires["scale"]
    else:
        out["Hires resize"] = f"{hires['resize_width']}x{hires['resize_height']}"
    out["Hires steps"] = hires["steps"]
    out["Hires upscaler"] = hires["upscaler"]
    if hires["scheduler"] != params["scheduler"] or hires.get("karras") != params.get("karras"):
        out["Hires sampler"] = sampler_names.to_a1111(hires["scheduler"], bool(hires.get("karras")))[0]
    if hires.get("prompt"):
        out["Hires prompt"] = hires["prompt"]
    if hires.get("negative_prompt"):
        out["Hires negative prompt"] = hires["negative_prompt"]
    return out
