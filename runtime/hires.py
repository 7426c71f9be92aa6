"""Hires fix: txt2img at the request's size, upscaled, then img2img at the target size, in one call
(AUTOMATIC1111 v1.10 modules/processing.py StableDiffusionProcessingTxt2Img).

    pipe.txt2img("a castle", height=512, width=512, hires=HiresFix(scale=2, upscaler="Latent"))

- Target size: `calculate_target_resolution` - `scale` times the first pass's size, or
  `resize_width` / `resize_height` (one of them keeps the aspect ratio; both: the image is scaled to
  cover that box and the latents are cropped to it, centred: `truncate_x/y`).
- Upscale: a latent upscaler ("Latent", "Latent (bicubic)", ...) resizes the first pass's latents
  (torch `interpolate`, runtime/imaging/upscale.py) and goes straight on, with no decode / encode
  in between; an image upscaler ("Lanczos", "Nearest", "None") decodes them, rounds to 8-bit as
  A1111 does (`255 * clamp(x)` truncated), resizes with PIL (`images.resize_image`, mode 0) and
  VAE-encodes the result (with the second pass's encode noise), as `sample_hr_pass`.
- Second pass: img2img of `strength` (A1111 `denoising_strength`) running `steps` steps (0: the
  first pass's; A1111 `hr_second_pass_steps`) - A1111 calls `sample_img2img(..., steps=...)`, so
  sd_samplers_common.setup_img2img_steps gives a schedule of int(steps / min(strength, 0.999))
  steps of which the last `steps` run. Its noise is drawn afresh from each image's seed at the
  target size (A1111 makes a new `rng.ImageRNG` with the same seeds), in the order of
  runtime/stages.py (noise, then the encode noise). `scheduler` / `karras` (A1111 `hr_sampler_name`
  / `hr_scheduler`) default to the first pass's, `prompt` / `negative_prompt` (`hr_prompt`,
  `hr_negative_prompt`) likewise. The VAE tiles at the target size where the folder's VAE needs it
  (`vae_tiling=None`).
"""

from __future__ import annotations

import dataclasses
import numbers
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from runtime.errors import PipelineError
from runtime.imaging import upscale as up

if TYPE_CHECKING:
    from runtime.request import Limits, Request

__all__ = ["HiresFix", "HiresPass", "hires_steps", "target_size"]

OPT_F = 8  # A1111 processing.py opt_f: the latent downscale its truncate_x/y divide by
MAX_STRENGTH = 0.999  # sd_samplers_common.setup_img2img_steps: min(denoising_strength, 0.999)


@dataclass(frozen=True)
class HiresFix:
    """The hires-fix settings of a txt2img call (A1111's names in brackets). `upscaler` is one of
    runtime.imaging.upscale.UPSCALERS [hr_upscaler]; `scale` [hr_scale] applies when `resize_width`
    and `resize_height` [hr_resize_x/y] are both 0; `steps` 0 takes the first pass's
    [hr_second_pass_steps]; `strength` [denoising_strength]; `scheduler` / `karras` [hr_sampler_name
    / hr_scheduler], `prompt` / `negative_prompt` [hr_prompt / hr_negative_prompt]: None (or "") takes
    the first pass's."""

    scale: float = 2.0
    upscaler: str = "Latent"
    steps: int = 0
    strength: float = 0.7
    resize_width: int = 0
    resize_height: int = 0
    scheduler: str | None = None
    karras: bool | None = None
    prompt: Any = None
    negative_prompt: Any = None


@dataclass(frozen=True, eq=False)
class HiresPass:
    """A hires fix prepared with its request: the settings as given, the target size (the image's),
    the centred crop of the upscaled latents (A1111 truncate_y, truncate_x), and the second pass as
    a Request (mode img2img at the target size; schedule and tokens built by Pipeline.request;
    `images` are filled in at run time for an image upscaler)."""

    spec: HiresFix
    height: int
    width: int
    truncate: tuple[int, int]
    request: "Request"
    steps: int  # the steps that run (A1111 Hires steps)

    def key(self) -> tuple:
        r = self.request
        return (self.spec.upscaler, self.height, self.width, self.truncate, r.steps, r.strength, r.sampler,
                r.karras, r.vae_tile, r.prompt_chunks)

    def parameters(self) -> dict[str, Any]:
        s = self.spec
        out: dict[str, Any] = {"upscaler": s.upscaler, "steps": self.steps, "strength": s.strength,
                               "height": self.height, "width": self.width, "scheduler": self.request.sampler,
                               "karras": self.request.karras}
        if s.resize_width or s.resize_height:
            out["resize_width"], out["resize_height"] = s.resize_width, s.resize_height
        else:
            out["scale"] = s.scale
        if s.prompt:
            out["prompt"] = s.prompt
        if s.negative_prompt:
            out["negative_prompt"] = s.negative_prompt
        return out


def target_size(height: int, width: int, spec: HiresFix) -> tuple[int, int, tuple[int, int]]:
    """(height, width, (truncate_y, truncate_x)) of A1111 calculate_target_resolution: the size the
    first pass is upscaled to, and the latent rows / columns cropped from it to reach the box."""
    rx, ry = spec.resize_width, spec.resize_height
    if rx == 0 and ry == 0:
        return int(height * spec.scale), int(width * spec.scale), (0, 0)
    if ry == 0:
        return rx * height // width, rx, (0, 0)
    if rx == 0:
        return ry, ry * width // height, (0, 0)
    if width / height < rx / ry:
        up_w, up_h = rx, rx * height // width
    else:
        up_w, up_h = ry * width // height, ry
    return up_h, up_w, ((up_h - ry) // OPT_F, (up_w - rx) // OPT_F)


def hires_steps(steps: int, strength: float) -> tuple[int, float]:
    """(schedule steps, schedule strength) that run exactly `steps` steps of A1111's
    setup_img2img_steps schedule, int(steps / min(strength, 0.999)) long, through
    runtime/scheduler.py's img2img rule (it runs int(n * strength) of n)."""
    n = int(steps / min(strength, MAX_STRENGTH))
    return n, min(1.0, (steps + 0.5) / n)


def check(limits: "Limits", hires: Any, height: int, width: int, steps: int) -> tuple[HiresFix, int, int,
                                                                                       tuple[int, int], int]:
    """Validate a txt2img call's `hires` (a HiresFix or a dict of its fields): (spec, target height,
    target width, truncate, steps run). Errors name `hires.<field>`."""
    if isinstance(hires, dict):
        unknown = set(hires) - {f.name for f in dataclasses.fields(HiresFix)}
        if unknown:
            raise PipelineError(f"hires: unknown settings {sorted(unknown)}", field=f"hires.{sorted(unknown)[0]}")
        hires = HiresFix(**hires)
    if not isinstance(hires, HiresFix):
        raise PipelineError(f"hires must be a HiresFix (or a dict of its fields); got {type(hires).__name__}",
                            field="hires")
    _check_fields(hires)
    h, w, truncate = target_size(height, width, hires)
    s = limits.vae_scale_factor
    h_out, w_out = h - truncate[0] * s, w - truncate[1] * s
    if h % s or w % s:
        raise PipelineError(f"the hires fix's upscaled size {w}x{h} (width x height) is not a multiple of the VAE "
                            f"scale factor {s}: choose hires scale / resize so that it is", field="hires.scale")
    lo, hi = limits.min_image, limits.max_image
    if not (lo <= h_out <= hi and lo <= w_out <= hi and h <= hi and w <= hi):
        raise PipelineError(f"the hires fix's size {w}x{h} (width x height) is outside the engine's image range "
                            f"[{lo}, {hi}]: lower the hires scale or rebuild the folder with a larger --max-image",
                            field="hires.scale")
    return hires, h, w, truncate, hires.steps or steps


def _check_fields(spec: HiresFix) -> None:
    if spec.upscaler not in up.UPSCALERS:
        raise PipelineError(f"upscaler {spec.upscaler!r} is not available here (an upscaler with weights, such as "
                            f"ESRGAN, SwinIR, LDSR or ScuNET, is not served); available: {', '.join(up.UPSCALERS)}",
                            field="hires.upscaler")
    for name in ("scale", "strength"):
        v = getattr(spec, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v) or v <= 0:
            raise PipelineError(f"hires {name} must be a positive number; got {v!r}", field=f"hires.{name}")
    if spec.strength > 1:
        raise PipelineError(f"hires strength must be in (0, 1]; got {spec.strength}", field="hires.strength")
    for name in ("steps", "resize_width", "resize_height"):
        v = getattr(spec, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise PipelineError(f"hires {name} must be an integer >= 0; got {v!r}", field=f"hires.{name}")


# --- the second pass --------------------------------------------------------------------------------------

def upscaled_latents(latents: np.ndarray, hp: HiresPass, scale: int) -> np.ndarray:
    """A latent upscaler's init latents for the second pass: interpolated, then cropped."""
    mode, antialias = up.LATENT_MODES[hp.spec.upscaler]
    out = up.interpolate(latents, (hp.height // scale, hp.width // scale), mode, antialias)
    return _crop(out, hp.truncate)


def upscaled_images(images: np.ndarray, hp: HiresPass, scale: int) -> tuple[np.ndarray, ...]:
    """An image upscaler's images [H, W, 3] in [0, 1] for the second pass's VAE encode: each first-pass
    image as A1111's 8-bit PIL image, resized to the target size (images.resize_image mode 0), cropped
    by the truncation (in pixels: the latents' crop times the scale factor)."""
    out = []
    for im in images:
        pil = Image.fromarray((255.0 * np.clip(im, 0.0, 1.0)).astype(np.uint8))
        big = up.resize_to(pil, hp.width, hp.height, hp.spec.upscaler)
        out.append(np.asarray(big, dtype=np.float32) / np.float32(255.0))
    return crop_pixels(tuple(out), hp.truncate, scale)


def crop_pixels(images: tuple[np.ndarray, ...], truncate: tuple[int, int], scale: int) -> tuple[np.ndarray, ...]:
    ty, tx = truncate
    return tuple(im[ty // 2 * scale:im.shape[0] - (ty + 1) // 2 * scale, tx // 2 * scale:im.shape[1] - (tx + 1) // 2
                    * scale] for im in images)


def _crop(latents: np.ndarray, truncate: tuple[int, int]) -> np.ndarray:
    """A1111 sample_hr_pass: samples[:, :, ty//2 : H-(ty+1)//2, tx//2 : W-(tx+1)//2]."""
    ty, tx = truncate
    h, w = latents.shape[-2:]
    return np.ascontiguousarray(latents[..., ty // 2:h - (ty + 1) // 2, tx // 2:w - (tx + 1) // 2])


def make_pass(limits: "Limits", first: "Request", hires: Any, vae_tiling: Any) -> HiresPass:
    """The hires pass of a validated txt2img request (called by runtime/request.py make_request):
    checked against the folder (target size in range, memory at the target size) and its second
    pass as an img2img Request sharing the first's seeds, guidance and output type."""
    from runtime.request import _fit_memory, _prompts, _vae_tile  # request.py imports this module

    if first.mode != "txt2img":
        raise PipelineError("hires applies to txt2img only; for img2img send the size you want", field="hires")
    spec, h, w, truncate, steps = check(limits, hires, first.height, first.width, first.steps)
    s = limits.vae_scale_factor
    h_out, w_out = h - truncate[0] * s, w - truncate[1] * s
    prompts, negatives = first.prompts, first.negative_prompts
    if spec.prompt or spec.negative_prompt:
        prompts, negatives = _prompts(spec.prompt or list(first.prompts),
                                      spec.negative_prompt or list(first.negative_prompts))
        if len(prompts) != len(first.prompts):
            raise PipelineError(f"hires prompt: {len(prompts)} prompts for the first pass's {len(first.prompts)}",
                                field="hires.prompt")
    n, strength = hires_steps(steps, spec.strength)
    tile, memory = _fit_memory(limits, first.batch, h_out, w_out, guided=first.guided, encodes=True,
                               tile=_vae_tile(limits, vae_tiling, h_out, w_out),
                               auto=vae_tiling is None and not first.tiling)
    second = dataclasses.replace(
        first, mode="img2img", prompts=prompts, negative_prompts=negatives, height=h_out, width=w_out, steps=n,
        strength=strength, sampler=first.sampler if spec.scheduler is None else spec.scheduler,
        karras=first.karras if spec.scheduler is None and spec.karras is None else spec.karras,
        noise=None, vae_tile=tile, memory=memory, tokens=None, schedule=None)
    if second.sampler not in limits.samplers:
        raise PipelineError(f"unknown hires scheduler {second.sampler!r}; expected one of "
                            f"{', '.join(limits.samplers)}", field="hires.scheduler")
    return HiresPass(spec, h, w, truncate, second, steps)


def second_pass(pipe: Any, prepared: list, latents: np.ndarray, callbacks: list, should_stop: list, progress: bool,
                timings: dict[str, float]) -> np.ndarray:
    """Run the hires pass of a batch (runtime/pipeline.py `Pipeline.generate`, after the first
    pass's denoise): each request's rows upscaled as its HiresPass says, then one img2img denoise
    of the whole batch at the target size. Returns the final latents."""
    from runtime import stages
    from runtime.pipeline import _Prepared

    s, m = pipe.vae_scale_factor, pipe.manifest
    second, start = [], 0
    for p in prepared:
        r, hp = p.request, p.request.hires
        rows, start = latents[start:start + r.batch], start + r.batch
        hr = hp.request
        draws = stages.initial_noise(hr, (m.dims.latent_channels, hr.height // s, hr.width // s), False)
        t0 = time.perf_counter()
        if up.is_latent(hp.spec.upscaler):
            image_latents = stages.ImageLatents(init=upscaled_latents(rows, hp, s))
        else:
            images = upscaled_images(pipe.decode(r, rows), hp, s)
            hr = dataclasses.replace(hr, images=images, images_per_prompt=1, prompts=_per_image(hr.prompts, r))
            graph = m.vae_graph("vae_encoder", hr.vae, hr.tiling)  # as the first pass's decode
            image_latents = stages.encode_images(pipe.engine(graph), hr, draws, scaling_factor=m.vae_scaling_factor(graph),
                                                 vae_scale_factor=s, inpainting_unet=False, tile=hr.vae_tile)
        timings["hires_upscale"] = timings.get("hires_upscale", 0.0) + time.perf_counter() - t0
        text = p.text if hr.tokens is r.tokens else pipe.encode_prompt(hr.tokens, r.images_per_prompt)
        second.append(_Prepared(hr, text, draws, image_latents))
    first_denoise = timings["denoise"]
    out = pipe._denoise(second, callbacks, should_stop, progress, timings)
    timings["hires_denoise"], timings["denoise"] = timings["denoise"], first_denoise
    return out


def _per_image(prompts: tuple[str, ...], first: "Request") -> tuple[str, ...]:
    """One prompt per image (the upscaled images are one per image, not one per prompt)."""
    return tuple(p for p in prompts for _ in range(first.images_per_prompt))
