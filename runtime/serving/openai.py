"""OpenAI's image generation wire format, `POST /v1/images/generations` (the Images API reference:
prompt, model, n, size, response_format, quality, style, user, and gpt-image-1's background,
moderation, output_format, output_compression), translated into our pipeline's settings.

`response_format` defaults to, and only accepts, "b64_json": the server stores no files, so it has
no URLs to hand out. `size` is "WIDTHxHEIGHT" within the engine folder's range, or "auto" (the
folder's size). Fields that would ask for something we cannot do ("hd" quality, a transparent
background, JPEG output) are refused with a 400 naming them, in OpenAI's error shape; the
diffusion settings OpenAI has no names for are our namespaced `sd_runtime` extension.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime.request import Limits

from .codec import WireError

__all__ = ["GenerationsRequest", "GenerationsResponse", "OpenAIExtension", "job_settings"]

_SIZE = re.compile(r"^(\d+)x(\d+)$")


class OpenAIExtension(BaseModel):
    """sd-runtime's settings for an OpenAI-format request (the `sd_runtime` field)."""

    model_config = ConfigDict(extra="forbid")
    negative_prompt: str = ""
    steps: int = Field(30, ge=1)
    guidance_scale: float = 7.5
    seed: int | None = Field(None, ge=0, description="image i uses seed + i; default: random")
    sampler: str | None = Field(None, description="our sampler name (GET /sdapi/v1/samplers lists A1111's)")
    vae: Literal["full", "tiny"] = Field("full", description="the folder's own VAE, or its tiny one (TAESD: "
                                                           "build-engine --tiny-vae)")


class GenerationsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str | None = "auto"
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    sd_runtime: OpenAIExtension | None = None


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class GenerationsResponse(BaseModel):
    created: int
    data: list[ImageData]


def _size(size: str | None, limits: Limits) -> tuple[int, int]:
    if size in (None, "auto"):
        return limits.default_size[1], limits.default_size[0]
    m = _SIZE.match(size)
    if not m:
        raise WireError("size", f"expected 'WIDTHxHEIGHT' or 'auto'; got {size!r}", 400)
    return int(m.group(1)), int(m.group(2))  # checked against the folder by the request layer


# The request layer's fields (runtime/request.py PipelineError.field) under their wire names here.
FIELDS = {"prompt": "prompt", "negative_prompt": "sd_runtime.negative_prompt", "scheduler": "sd_runtime.sampler",
          "height": "size", "width": "size", "vae": "sd_runtime.vae"}


def job_settings(req: GenerationsRequest, limits: Limits, max_steps: int) -> list[dict[str, Any]]:
    """One `Pipeline.request` keyword set per engine job (n images in jobs of at most max_batch), for
    the folder `model` picked (runtime/serving/models.py; `limits` are that folder's)."""
    if req.response_format == "url":
        raise WireError("response_format", "'url' is not supported: this server stores no files; use 'b64_json'", 400)
    refused = [("quality", req.quality, ("standard", "auto", "medium")), ("style", req.style, ("natural", "vivid")),
               ("background", req.background, ("auto", "opaque")), ("output_format", req.output_format, ("png",))]
    for name, value, ok in refused:
        if value is not None and value not in ok:
            raise WireError(name, f"{value!r} is not supported here; accepted: {', '.join(ok)}", 400)
    width, height = _size(req.size, limits)
    ext = req.sd_runtime or OpenAIExtension()
    recommended = {k: v for k, v in (("steps", limits.default_steps), ("guidance_scale", limits.default_guidance))
                   if v is not None and k not in ext.model_fields_set}  # the folder's (manifest "defaults")
    ext = ext.model_copy(update=recommended)
    if ext.steps > max_steps:
        raise WireError("sd_runtime.steps", f"{ext.steps} is over this server's limit {max_steps}", 400)
    seed = secrets.randbits(32) if ext.seed is None else ext.seed
    jobs, start = [], 0
    while start < req.n:
        k = min(limits.max_batch, req.n - start)
        jobs.append(dict(prompt=req.prompt, negative_prompt=ext.negative_prompt, height=height, width=width,
                         num_inference_steps=ext.steps, guidance_scale=ext.guidance_scale, scheduler=ext.sampler,
                         seed=seed + start, num_images_per_prompt=k, vae=ext.vae))
        start += k
    return jobs
