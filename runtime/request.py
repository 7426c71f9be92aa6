"""What to generate: a frozen `Request`, validated once at the door by `make_request`.

A request holds everything that decides its images: the mode, prompts, size, sampler settings,
one seed per image, the init images and masks already converted to arrays at the request size,
and any explicit noise arrays. Arrays are private read-only copies, so a request cannot change
after validation and never aliases a caller's buffer. `Limits` is what validation needs to know
of an engine folder (its shape range, batch limit, defaults), taken from the manifest.

Requests with the same `batch_key()` can run as one engine batch (runtime/pipeline.py): same mode,
size, steps, sampler, guidance and strength; prompts, seeds and images may differ.
"""

from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime import control as controlnet
from runtime import hires as hires_fix
from runtime.imaging import inpainting
from runtime.imaging import images as imgs
from runtime.sampling.deepcache import SCHEDULES
from runtime.errors import PipelineError
from runtime.families import family_of
from runtime.folder.manifest import Manifest
from runtime.folder.networks import STEP_CACHE_NETWORKS, TILING_NETWORKS, VAE_CHOICES, controlnet_name
from runtime.text.prompt_syntax import SYNTAXES
from runtime.imaging.tiling import DEFAULT_TILE, needs_tiling
from runtime.memory import GiB, MemoryModel
from runtime.sampling.variation import Variation, make_variation
from runtime.sampling.schedules import SPACINGS
from runtime.scheduler import eta_refusal

if TYPE_CHECKING:
    from runtime.scheduler import Schedule
    from runtime.stages import PromptTokens

MODES = ("txt2img", "img2img", "inpaint")
OUTPUT_TYPES = ("pil", "np", "latent")
DEFAULT_STEPS = 50  # diffusers' StableDiffusionPipeline default
DEFAULT_GUIDANCE = 7.5  # diffusers' default
DEFAULT_STRENGTH = {"img2img": 0.75, "inpaint": 1.0}  # diffusers' img2img / inpaint pipeline defaults


@dataclass(frozen=True)
class Limits:
    """What request validation needs to know of an engine folder."""

    min_image: int
    max_image: int
    max_batch: int
    vae_scale_factor: int
    latent_channels: int
    default_size: tuple[int, int]
    inpainting_unet: bool  # a 9-channel U-Net: inpaint only
    default_sampler: str
    samplers: tuple[str, ...]
    step_cache: bool = False  # the folder has the unet_deep / unet_shallow graphs (build-engine --step-cache)
    vae_max_image: int | None = None  # the largest side the VAE graphs take whole (manifest shapes "vae_max_image")
    memory: MemoryModel | None = None  # runtime/memory.py: the folder's memory estimate (None: no check)
    max_memory: int | None = None  # bytes a request's estimate may reach (None: no limit)
    tiling: bool = False  # the folder has the circular-padded graphs (build-engine --tiling)
    guidance_batch: bool = True  # its family runs an unconditional batch under guidance (runtime/families.py)
    tiny_vae: str | None = None  # Manifest.tiny_vae: how vae="tiny" runs ("added", "own"), None: it cannot
    # the folder's recommended steps and guidance (manifest "defaults"; runtime/sampling/defaults.py),
    # used where a request gives none; None: the API's own default
    default_steps: int | None = None
    default_guidance: float | None = None
    controlnets: tuple[str, ...] = ()  # the folder's ControlNets' names (networks "controlnet.NAME")
    second_prompt: bool = False  # its family has a second text encoder, which prompt_2 / negative_prompt_2 feed (SDXL)

    @classmethod
    def from_manifest(cls, m: Manifest, default_sampler: str, samplers: tuple[str, ...]) -> "Limits":
        lo, hi = int(m.shapes["min_image"]), int(m.shapes["max_image"])
        s = m.dims.vae_scale_factor
        # the model's native size, clamped into the folder's shape range (a folder built with
        # --max-image below the native size still has a usable default)
        default = tuple(min(max(int(d), lo), hi) // s * s for d in m.default_size)
        return cls(min_image=lo, max_image=hi, max_batch=int(m.shapes["max_batch"]), vae_scale_factor=s,
                   latent_channels=m.dims.latent_channels, default_size=default,
                   inpainting_unet=m.dims.unet_in_channels == 2 * m.dims.latent_channels + 1,
                   default_sampler=m.defaults.get("sampler", default_sampler),
                   samplers=samplers, step_cache=all(n in m.networks for n in STEP_CACHE_NETWORKS),
                   vae_max_image=m.shapes.get("vae_max_image", hi),
                   tiling=all(n in m.networks for n in TILING_NETWORKS), guidance_batch=family_of(m.family).guidance_batch,
                   tiny_vae=m.tiny_vae, default_steps=m.defaults.get("steps"),
                   default_guidance=m.defaults.get("guidance_scale"),
                   controlnets=tuple(c for c in map(controlnet_name, m.networks) if c is not None),
                   second_prompt=any(use.second for use in family_of(m.family).text_encoders))


@dataclass(frozen=True, eq=False)
class Request:
    """One validated generation request. `seeds` has one entry per image; image i uses prompt
    i // images_per_prompt. `images` / `masks` (img2img, inpaint) are float32 arrays at the request
    size, one per prompt: images [H, W, 3] in [0, 1], masks [H, W] in {0, 1} (1 = repaint; grey levels
    in [0, 1] under A1111's inpainting, `inpainting`, runtime/imaging/inpainting.py)."""

    mode: str
    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    images_per_prompt: int
    height: int
    width: int
    steps: int
    guidance_scale: float
    guidance_rescale: float
    sampler: str
    karras: bool | None
    eta: float
    strength: float
    seeds: tuple[int, ...]
    output_type: str = "pil"
    images: tuple[np.ndarray, ...] | None = None
    masks: tuple[np.ndarray, ...] | None = None
    noise: np.ndarray | None = None
    encode_noise: np.ndarray | None = None
    masked_encode_noise: np.ndarray | None = None
    cache_interval: int = 1  # step caching (runtime/sampling/deepcache.py): 1 = off
    cache_schedule: str = "uniform"
    prompt_syntax: str = "a1111"  # A1111 emphasis and BREAK where a prompt uses them; "none": literal
    inpainting: inpainting.Inpainting | None = None  # A1111's inpainting (runtime/imaging/inpainting.py); None: diffusers'
    initial_noise_multiplier: float = 1.0  # A1111's: the initial noise scaled by it (img2img, inpaint)
    vae_tile: int | None = None  # VAE tiles of this many latent pixels (runtime/imaging/tiling.py); None: whole
    tiling: bool = False  # seamless textures: the circular-padded graphs (runtime/folder/networks.py TILING_NETWORKS)
    memory: int | None = None  # its estimated peak bytes (runtime/memory.py), None without a memory model
    variation: Variation | None = None  # variation seeds / seed resizing (runtime/sampling/variation.py); None: off
    hires: Any = None  # txt2img's hires fix (runtime/hires.py HiresPass): a second, img2img pass
    guidance_batch: bool = True  # Limits.guidance_batch of its folder: whether guidance > 1 runs an uncond batch
    timestep_spacing: str | None = None  # replaces the folder's scheduler config's (A1111's "SGM Uniform": trailing)
    vae: str = "full"  # which autoencoder decodes and encodes: "full" or "tiny" (runtime/folder/networks.py VAE_CHOICES)
    control: controlnet.Control | None = None  # its ControlNets (runtime/control.py); None: plain U-Net
    # SDXL: the second text encoder's prompts (diffusers' prompt_2 / negative_prompt_2); None: the same as
    # prompts / negative_prompts
    prompts_2: tuple[str, ...] | None = None
    negative_prompts_2: tuple[str, ...] | None = None
    # A hand-over between two runs (SDXL base -> refiner; diffusers' denoising_end / denoising_start, fractions
    # of the training timesteps, runtime/scheduler.py make_schedule): this run stops at `denoising_end` (its
    # latents still noisy) or starts at `denoising_start` from `init_latents` as they are (img2img of latents
    # [batch, C, lh, lw], as the loop holds them: no VAE encode, and without denoising_start noised as usual)
    denoising_start: float | None = None
    denoising_end: float | None = None
    init_latents: np.ndarray | None = field(default=None, repr=False)
    # Prepared once by Pipeline.request and carried to the stages: the prompts' token ids
    # (runtime/stages.py PromptTokens) and the sampler's built schedule (runtime/scheduler.py Schedule)
    tokens: PromptTokens | None = field(default=None, repr=False)
    schedule: Schedule | None = field(default=None, repr=False)
    # and the folder's textual-inversion names its prompts and negative prompts use (a refiner taking
    # over must have them too: runtime/handover.py)
    embeddings_used: tuple[str, ...] = ()

    @property
    def prompt_chunks(self) -> int | None:
        """77-token chunks its prompts encode to (None before Pipeline.request tokenized them)."""
        return None if self.tokens is None else self.tokens.n_chunks

    @property
    def batch(self) -> int:
        return len(self.seeds)

    @property
    def guided(self) -> bool:
        """Classifier-free guidance on (an unconditional pass runs): never for a family that embeds
        the scale instead (an LCM-distilled U-Net)."""
        return self.guidance_batch and self.guidance_scale > 1.0

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one engine batch."""
        return (self.mode, self.height, self.width, self.steps, self.guidance_scale, self.guidance_rescale,
                self.sampler, self.karras, self.eta, self.strength, self.output_type, self.cache_interval,
                self.cache_schedule, self.prompt_syntax, self.vae_tile, self.prompt_chunks,
                None if self.inpainting is None else self.inpainting.key(), self.initial_noise_multiplier,
                None if self.hires is None else self.hires.key(), self.tiling, self.vae, self.timestep_spacing,
                None if self.control is None else self.control.key(), self.denoising_start, self.denoising_end,
                self.init_latents is None)

    def parameters(self) -> dict[str, Any]:
        """What reproduces the request (the result's `parameters`, the PNG metadata)."""
        params = {
            "mode": self.mode, "prompt": list(self.prompts) if len(self.prompts) > 1 else self.prompts[0],
            "negative_prompt": (list(self.negative_prompts) if len(self.negative_prompts) > 1
                                else self.negative_prompts[0]),
            "steps": self.steps, "scheduler": self.sampler, "karras": self.karras,
            "guidance_scale": self.guidance_scale, "guidance_rescale": self.guidance_rescale, "eta": self.eta,
            "height": self.height, "width": self.width, "seeds": list(self.seeds),
        }
        if self.mode != "txt2img" and self.denoising_start is None:
            params["strength"] = self.strength
        for key in ("denoising_start", "denoising_end"):
            if getattr(self, key) is not None:
                params[key] = getattr(self, key)
        if self.cache_interval > 1:
            params["cache_interval"], params["cache_schedule"] = self.cache_interval, self.cache_schedule
        if self.prompt_syntax != "a1111":
            params["prompt_syntax"] = self.prompt_syntax
        if self.vae_tile is not None:
            params["vae_tile"] = self.vae_tile
        if self.variation is not None:
            params.update(self.variation.parameters())
        if self.inpainting is not None:
            params.update(self.inpainting.parameters())
        if self.initial_noise_multiplier != 1.0:
            params["initial_noise_multiplier"] = self.initial_noise_multiplier
        if self.hires is not None:
            params["hires"] = self.hires.parameters()
        if self.tiling:
            params["tiling"] = True
        if self.vae != "full":
            params["vae"] = self.vae
        if self.timestep_spacing is not None:
            params["timestep_spacing"] = self.timestep_spacing
        if self.control is not None:
            params.update(self.control.parameters())
        return params


# long: one check per keyword, in the order they depend on each other (size before tiling before memory)
def make_request(limits: Limits, mode: str, prompt: Any, *, negative_prompt: Any = None, height: Any = None,
                 width: Any = None, num_inference_steps: Any = None, guidance_scale: Any = None,
                 guidance_rescale: Any = 0.0, scheduler: str | None = None, karras: bool | None = None,
                 seed: Any = None, num_images_per_prompt: Any = 1, eta: Any = 0.0, output_type: str = "pil",
                 image: Any = None, mask_image: Any = None, strength: Any = None, noise: Any = None,
                 encode_noise: Any = None, masked_encode_noise: Any = None, cache_interval: Any = 1,
                 cache_schedule: str = "uniform", prompt_syntax: str = "a1111", vae_tiling: Any = None,
                 subseed: Any = None, subseed_strength: Any = 0.0, seed_resize_from: Any = None,
                 masked_content: Any = None, padding_mask_crop: Any = None, mask_blur: Any = 0, soft_mask: Any = False,
                 overlay: Any = None, initial_noise_multiplier: Any = 1.0, hires: Any = None, tiling: Any = False,
                 vae: Any = "full", timestep_spacing: Any = None, prompt_2: Any = None,
                 negative_prompt_2: Any = None, denoising_start: Any = None, denoising_end: Any = None,
                 **control: Any) -> Request:
    """Validate a request against `limits`; raise PipelineError naming the first problem. `hires`
    (txt2img: a runtime/hires.py HiresFix) adds the hires fix's second pass. Steps, guidance and
    sampler left at None: the folder's recommended ones (`_recommended`), else the API's defaults.
    `prompt_2` / `negative_prompt_2`: SDXL's second text encoder's (None: the same as prompt /
    negative_prompt). `control`: the ControlNet settings (runtime/control.py make_control: control_image, controlnet, ...).
    `denoising_start` / `denoising_end`: a hand-over (`_hand_over`); an img2img `image` that is a 4-D array
    [batch or 1, latent channels, lh, lw] is latents (`_init_latents`), the request's size then theirs."""
    if mode not in MODES:
        raise PipelineError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if limits.inpainting_unet and mode != "inpaint":
        raise PipelineError("this engine folder holds an inpainting U-Net (9 input channels): use inpaint()")
    prompts, negatives = _prompts(prompt, negative_prompt)
    second = _second_prompts(limits, prompt_2, negative_prompt_2, len(prompts))
    n_per = _positive_int(num_images_per_prompt, "num_images_per_prompt")
    batch = len(prompts) * n_per
    if batch > limits.max_batch:
        raise PipelineError(f"{batch} images in one call exceed the engine's max batch {limits.max_batch}",
                            field="num_images_per_prompt")
    steps, guidance_scale = _recommended(limits, num_inference_steps, guidance_scale)
    scale, rescale, eta = (_finite(v, k) for v, k in ((guidance_scale, "guidance_scale"),
                                                      (guidance_rescale, "guidance_rescale"), (eta, "eta")))
    if output_type not in OUTPUT_TYPES:
        raise PipelineError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")
    sampler = _sampler(limits, scheduler, karras, eta)
    strength = _strength(mode, strength)
    interval = _cache(limits, cache_interval, cache_schedule)
    if prompt_syntax not in SYNTAXES:
        raise PipelineError(f"prompt_syntax must be one of {', '.join(SYNTAXES)}; got {prompt_syntax!r}")
    plan = inpainting.settings(mode, masked_content=masked_content, padding_mask_crop=padding_mask_crop,
                               mask_blur=mask_blur, soft_mask=soft_mask, overlay=overlay)
    noise_mult = _noise_multiplier(mode, initial_noise_multiplier)
    start, end = _hand_over(mode, denoising_start, denoising_end, hires)
    latents = _init_latents(limits, mode, image, batch)
    if latents is None:
        images, masks, (dh, dw) = _images(limits, mode, image, mask_image, len(prompts))
    else:
        images, masks, (dh, dw) = None, None, tuple(d * limits.vae_scale_factor for d in latents.shape[-2:])
        if (height or dh, width or dw) != (dh, dw):
            raise PipelineError(f"img2img of latents runs at their size {dw}x{dh} (width x height); got "
                                f"{width}x{height}", field="height")
    height, width = _size(limits, dh if height is None else height, dw if width is None else width)
    tile = _vae_tile(limits, vae_tiling, height, width)
    tiling = _tiling(limits, tiling, interval, tile)
    vae, timestep_spacing = _vae(limits, vae, tiling), _spacing(timestep_spacing)
    tile, memory = _fit_memory(limits, batch, height, width, guided=_guided(limits, scale, rescale),
                               encodes=mode != "txt2img" and latents is None, tile=tile,
                               auto=vae_tiling is None and not tiling)
    images, masks, plan = _load_images(images, masks, plan, height, width)
    ctrl = _control(limits, control, height, width, interval, tiling, hires)
    shape = (batch, limits.latent_channels, height // limits.vae_scale_factor, width // limits.vae_scale_factor)
    seeds, variation = _variation(limits, seed, batch, subseed, subseed_strength, seed_resize_from, noise)
    request = Request(
        mode=mode, prompts=prompts, negative_prompts=negatives, images_per_prompt=n_per, height=height, width=width,
        steps=steps, guidance_scale=scale, guidance_rescale=rescale, sampler=sampler, karras=karras, eta=eta,
        strength=strength, seeds=seeds, output_type=output_type, images=images, masks=masks,
        noise=_explicit(noise, shape, "latents" if mode == "txt2img" else "noise"),
        encode_noise=_explicit(encode_noise, shape, "encode_noise") if mode != "txt2img" else None,
        masked_encode_noise=(_explicit(masked_encode_noise, shape, "masked_encode_noise")
                             if mode == "inpaint" and limits.inpainting_unet else None),
        cache_interval=interval, cache_schedule=cache_schedule, prompt_syntax=prompt_syntax, vae_tile=tile,
        memory=memory, variation=variation, inpainting=plan, initial_noise_multiplier=noise_mult, tiling=tiling,
        guidance_batch=limits.guidance_batch, vae=vae, timestep_spacing=timestep_spacing,
        control=ctrl, prompts_2=second[0], negative_prompts_2=second[1], denoising_start=start, denoising_end=end,
        init_latents=latents,
    )
    return request if hires is None else replace(request, hires=hires_fix.make_pass(limits, request, hires, vae_tiling))


def _hand_over(mode: str, start: Any, end: Any, hires: Any) -> tuple[float | None, float | None]:
    """denoising_start (img2img) / denoising_end (txt2img, img2img): fractions in (0, 1), start below end
    (diffusers 0.42 StableDiffusionXLImg2ImgPipeline.check_inputs); the sampler's support is checked where the
    schedule is built (runtime/scheduler.py HAND_OVER_SAMPLERS)."""
    out = []
    for value, name, modes in ((start, "denoising_start", ("img2img",)),
                               (end, "denoising_end", ("txt2img", "img2img"))):
        if value is None:
            out.append(None)
            continue
        if mode not in modes:
            raise PipelineError(f"{name} applies to {' and '.join(modes)} only", field=name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
            raise PipelineError(f"{name} must be a number in (0, 1): the fraction of the schedule where the "
                                f"hand-over happens; got {value!r}", field=name)
        out.append(float(value))
    if out[0] is not None and out[1] is not None and out[0] >= out[1]:
        raise PipelineError(f"denoising_start {out[0]} must be below denoising_end {out[1]}", field="denoising_start")
    if out[1] is not None and hires is not None:
        raise PipelineError("denoising_end stops with noisy latents; the hires fix needs finished ones: drop one",
                            field="denoising_end")
    return out[0], out[1]


def _init_latents(limits: Limits, mode: str, image: Any, batch: int) -> np.ndarray | None:
    """An img2img `image` given as latents ([batch or 1, latent channels, lh, lw], as the loop holds them:
    a txt2img run's output_type "latent"), as a private read-only float32 copy of the batch; None for
    images. diffusers' img2img pipelines take a 4-channel tensor `image` so (VaeImageProcessor.preprocess
    passes it through; prepare_latents repeats a smaller batch that divides the batch)."""
    if not (isinstance(image, np.ndarray) and image.ndim == 4):
        return None
    if mode != "img2img":
        raise PipelineError(f"latents as the image apply to img2img only, not {mode}", field="image")
    if image.shape[1] != limits.latent_channels or image.shape[0] not in (1, batch):
        raise PipelineError(f"image latents must have shape [{batch} or 1, {limits.latent_channels}, latent height, "
                            f"latent width]; got {list(image.shape)}", field="image")
    latents = _explicit(np.tile(image, (batch // image.shape[0], 1, 1, 1)), (batch,) + image.shape[1:], "image")
    if not np.isfinite(latents).all():
        raise PipelineError("image latents hold NaN or infinite values", field="image")
    return latents


def _control(limits: Limits, settings: dict[str, Any], height: int, width: int, interval: int, tiling: bool,
             hires: Any) -> controlnet.Control | None:
    """The request's ControlNets (runtime/control.py), refused with step caching, tiling and the
    hires fix, which have no graphs with ControlNet residuals."""
    ctrl = controlnet.make_control(limits.controlnets, height, width, **settings)
    if ctrl is not None:
        for on, what in ((interval > 1, "cache_interval"), (tiling, "tiling"), (hires is not None, "hires")):
            if on:
                raise PipelineError(f"ControlNet does not combine with {what} (no such graph takes ControlNet "
                                    "residuals); drop one of them", field=what)
    return ctrl


def _sampler(limits: Limits, scheduler: str | None, karras: Any, eta: float) -> str:
    """The request's sampler (the folder's default when None), checked with its karras and eta."""
    sampler = limits.default_sampler if scheduler is None else scheduler
    if sampler not in limits.samplers:
        raise PipelineError(f"unknown scheduler {sampler!r}; expected one of {', '.join(limits.samplers)}")
    if karras not in (None, True, False):
        raise PipelineError(f"karras must be True, False or None; got {karras!r}")
    if eta_refusal(sampler, eta):  # the sampler's record says which eta it takes (runtime/scheduler.py)
        raise PipelineError(eta_refusal(sampler, eta), field="eta")
    return sampler


def _guided(limits: Limits, scale: float, rescale: float) -> bool:
    """Whether the request runs classifier-free guidance's unconditional batch: never for a family
    that embeds the guidance scale instead (runtime/families.py), where guidance_rescale is refused."""
    if rescale and not limits.guidance_batch:
        raise PipelineError("guidance_rescale applies to classifier-free guidance, which this folder's U-Net does not "
                            "run (it embeds the guidance scale): leave it at 0", field="guidance_rescale")
    return limits.guidance_batch and scale > 1.0


def _variation(limits: Limits, seed: Any, batch: int, subseed: Any, strength: Any, resize_from: Any,
               noise: Any) -> tuple[tuple[int, ...], Variation | None]:
    """(one seed per image, the variation-seed settings or None): runtime/sampling/variation.py."""
    seeds, variation = make_variation(_seeds(seed, batch), seed, subseed, strength, resize_from,
                                      scale=limits.vae_scale_factor, max_image=limits.max_image)
    if variation is not None and noise is not None:
        raise PipelineError("explicit latents / noise replace the seeded initial noise, which variation seeds and "
                            "seed_resize_from make: send one or the other", field="subseed_strength")
    return seeds, variation


def _fit_memory(limits: Limits, batch: int, height: int, width: int, *, guided: bool, encodes: bool,
                tile: int | None, auto: bool) -> tuple[int | None, int | None]:
    """(VAE tile, memory estimate) of a request; refused when the estimate exceeds the limit, before it
    runs. With `vae_tiling` left to the runtime (`auto`), an image whose whole-image VAE pass would not
    fit in the limit but whose tiled one would decodes in tiles of DEFAULT_TILE (as ComfyUI falls back
    to a tiled decode), instead of being refused."""
    if limits.memory is None:
        return tile, None
    need = limits.memory.estimate(batch, height, width, guided=guided, encodes=encodes, vae_tile=tile)
    if limits.max_memory is None or need <= limits.max_memory:
        return tile, need
    if auto and tile is None and max(height, width) > DEFAULT_TILE * limits.vae_scale_factor:
        tiled = limits.memory.estimate(batch, height, width, guided=guided, encodes=encodes, vae_tile=DEFAULT_TILE)
        if tiled <= limits.max_memory:
            return DEFAULT_TILE, tiled
    raise PipelineError(
        f"{batch} image(s) of {width}x{height}{' with guidance' if guided else ''} need about {_gib(need)} "
        f"(estimate: runtime/memory.py), more than the limit of {_gib(limits.max_memory)} (max_memory_gb; "
        "default: this machine's memory). Ask for fewer images per call or a smaller size, or raise max_memory_gb")


def check_memory(limits: Limits, batch: int, height: int, width: int, *, guided: bool, encodes: bool,
                 vae_tile: int | None = None) -> int | None:
    """The batch's memory estimate (runtime/memory.py; None without a memory model) with the VAE
    whole or in tiles of `vae_tile` latent pixels; refuse it when it exceeds the limit, before it runs."""
    return _fit_memory(limits, batch, height, width, guided=guided, encodes=encodes, tile=vae_tile, auto=False)[1]


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB // 10 else f"{n / (1 << 20):.0f} MiB"


# --- field checks -------------------------------------------------------------------------------------

def _second_prompts(limits: Limits, prompt_2: Any, negative_prompt_2: Any,
                    n: int) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """prompt_2 / negative_prompt_2, one per prompt (None where not given: the first prompts serve),
    refused for a folder with one text encoder."""
    if prompt_2 is None and negative_prompt_2 is None:
        return None, None
    field = "prompt_2" if prompt_2 is not None else "negative_prompt_2"
    if not limits.second_prompt:
        raise PipelineError(f"{field} feeds a second text encoder (SDXL), which this engine folder's model lacks",
                            field=field)
    out = []
    for value, name in ((prompt_2, "prompt_2"), (negative_prompt_2, "negative_prompt_2")):
        texts = None if value is None else tuple(_per_prompt(value, n, name))
        if texts is not None and not all(isinstance(t, str) for t in texts):
            raise PipelineError(f"{name} must be a string or a list of strings, one per prompt", field=name)
        out.append(texts)
    return out[0], out[1]


def _prompts(prompt: Any, negative_prompt: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise PipelineError("prompt must be a string or a non-empty list of strings")
    negatives = _per_prompt("" if negative_prompt is None else negative_prompt, len(prompts), "negative_prompt")
    if not all(isinstance(p, str) for p in negatives):
        raise PipelineError("negative_prompt must be a string or a list of strings")
    return tuple(prompts), tuple(negatives)


def _per_prompt(value: Any, n: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise PipelineError(f"{what}: got a list of {len(value)}, expected one per prompt ({n})")
        return list(value)
    return [value] * n


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value or value < 1:
        raise PipelineError(f"{what} must be a positive integer; got {value!r}")
    return int(value)


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise PipelineError(f"{what} must be a finite number; got {value!r}")
    return float(value)


def _strength(mode: str, strength: Any) -> float:
    if mode == "txt2img":
        if strength is not None:
            raise PipelineError("strength applies to img2img and inpaint only")
        return 1.0
    value = _finite(DEFAULT_STRENGTH[mode] if strength is None else strength, "strength")
    if not 0.0 < value <= 1.0:
        raise PipelineError(f"strength must be in (0, 1]; got {strength}")
    return value


def _load_images(images: list | None, masks: list | None, plan: inpainting.Inpainting | None, height: int,
                 width: int) -> tuple[tuple | None, tuple | None, inpainting.Inpainting | None]:
    """The request's images and masks as frozen arrays at its size: A1111's preparation under its
    inpainting (runtime/imaging/inpainting.py), else loaded and resized (masks binarized)."""
    if plan is not None:
        return inpainting.prepare(plan, images, masks, height, width)
    if images is not None:
        images = tuple(_frozen(imgs.load_image(im, height, width)) for im in images)
    if masks is not None:
        masks = tuple(_frozen(imgs.load_mask(mk, height, width)) for mk in masks)
    return images, masks, None


def _noise_multiplier(mode: str, value: Any) -> float:
    """A1111's initial_noise_multiplier (img2img and inpaint; 1 = off)."""
    mult = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    if not math.isfinite(mult) or mult <= 0 or (mode == "txt2img" and mult != 1.0):
        raise PipelineError(f"initial_noise_multiplier must be a number > 0 and applies to img2img and inpaint only; "
                            f"got {value!r}",
                            field="initial_noise_multiplier")
    return mult


def _vae_tile(limits: Limits, vae_tiling: Any, height: int, width: int) -> int | None:
    """The VAE tile size in latent pixels, or None for the whole image. `vae_tiling`: True (tiles of
    DEFAULT_TILE), False, an int (tile size in pixels), or None: tiles only where a side exceeds what
    the folder's VAE takes (`Limits.vae_max_image`, e.g. a TensorRT profile kept small)."""
    s = limits.vae_scale_factor
    if vae_tiling is None:
        vae_tiling = needs_tiling(height, width, max_image=limits.vae_max_image)
    if vae_tiling is False:
        return None
    if vae_tiling is True:
        return DEFAULT_TILE
    pixels = _positive_int(vae_tiling, "vae_tiling (a tile size in pixels, True, False or None)")
    if pixels % s or pixels < 4 * s:
        raise PipelineError(f"vae_tiling: a tile of {pixels} pixels must be a multiple of {s} and at least {4 * s}")
    return pixels // s


def _tiling(limits: Limits, tiling: Any, cache_interval: int, vae_tile: int | None) -> bool:
    """Whether the request runs the circular-padded graphs (A1111's `tiling`: seamless textures)."""
    if tiling not in (True, False):
        raise PipelineError(f"tiling must be True or False; got {tiling!r}", field="tiling")
    if not tiling:
        return False
    if not limits.tiling:
        raise PipelineError("tiling needs the circular-padded graphs (unet_tiled, vae_decoder_tiled, vae_encoder_tiled), "
                            "which this engine folder lacks: rebuild it with build-engine --tiling", field="tiling")
    if cache_interval > 1:
        raise PipelineError("tiling has no step-cache graphs: send cache_interval 1 with tiling", field="tiling")
    if vae_tile is not None:
        raise PipelineError("tiling wraps the whole image around; a VAE decoded in tiles cannot: send vae_tiling False "
                            "(or a size the folder's VAE takes whole) with tiling", field="tiling")
    return True


def _recommended(limits: Limits, steps: Any, scale: Any) -> tuple[int, Any]:
    """Steps (checked) and guidance: the folder's recommended (manifest "defaults") or the API's where None."""
    if steps is None:
        steps = DEFAULT_STEPS if limits.default_steps is None else limits.default_steps
    if scale is None:
        scale = DEFAULT_GUIDANCE if limits.default_guidance is None else limits.default_guidance
    return _positive_int(steps, "num_inference_steps"), scale


def _spacing(spacing: Any) -> str | None:
    """A timestep spacing replacing the folder's scheduler config's (None: the folder's)."""
    if spacing not in (None, *SPACINGS):
        raise PipelineError(f"timestep_spacing must be one of {', '.join(SPACINGS)} (or None: the folder's); got "
                            f"{spacing!r}", field="timestep_spacing")
    return spacing


def _vae(limits: Limits, vae: Any, tiling: bool) -> str:
    """The request's autoencoder: "full" (the folder's VAE) or "tiny" (a TAESD: build-engine --tiny-vae)."""
    if vae not in VAE_CHOICES:
        raise PipelineError(f"vae must be one of {', '.join(VAE_CHOICES)}; got {vae!r}", field="vae")
    if vae == "tiny" and limits.tiny_vae is None:
        raise PipelineError("vae 'tiny' needs a tiny autoencoder (vae_decoder_tiny, vae_encoder_tiny), which this "
                            "engine folder lacks: rebuild it with build-engine --tiny-vae PATH", field="vae")
    if vae == "tiny" and tiling and limits.tiny_vae == "added":
        raise PipelineError("tiling has no circular-padded tiny VAE graphs: send vae 'full' with tiling", field="vae")
    return vae


def _cache(limits: Limits, interval: Any, schedule: str) -> int:
    interval = _positive_int(interval, "cache_interval")
    if schedule not in SCHEDULES:
        raise PipelineError(f"unknown cache_schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}",
                            field="cache_schedule")
    if interval > 1 and not limits.step_cache:
        raise PipelineError(f"cache_interval {interval} needs the step-cache U-Nets (unet_deep, unet_shallow), which "
                            "this engine folder lacks: rebuild it with build-engine --step-cache", field="cache_interval")
    return interval


def _images(limits: Limits, mode: str, image: Any, mask_image: Any, n_prompts: int):
    """(images, masks, default size) of a request, each list one per prompt (None where unused)."""
    if mode == "txt2img":
        if image is not None or mask_image is not None:
            raise PipelineError("txt2img takes no image or mask_image; use img2img or inpaint")
        return None, None, limits.default_size
    if image is None:
        raise PipelineError(f"{mode} needs an image")
    images = _per_prompt(image, n_prompts, "image")
    sizes = {imgs.image_size(im) for im in images}
    if len(sizes) > 1:
        raise PipelineError(f"the images of one call must share one size; got {sorted(sizes)}")
    size = sizes.pop()
    masks = None
    if mode == "inpaint":
        if mask_image is None:
            raise PipelineError("inpaint needs a mask_image")
        masks = _per_prompt(mask_image, n_prompts, "mask_image")
        for mk in masks:
            if imgs.image_size(mk) != size:
                (h0, w0), (h1, w1) = size, imgs.image_size(mk)
                raise PipelineError(f"the mask is {w1}x{h1} (width x height) but the image is {w0}x{h0}; "
                                    "they must have the same size")
    elif mask_image is not None:
        raise PipelineError("img2img takes no mask_image; use inpaint")
    s = limits.vae_scale_factor
    return images, masks, tuple(d - d % s for d in size)  # diffusers' get_default_height_width


def _size(limits: Limits, height: Any, width: Any) -> tuple[int, int]:
    """The request's size, checked against the folder; an error's `field` is the side at fault."""
    s = limits.vae_scale_factor

    def refuse(bad_height: bool, message: str, hint: str = "") -> PipelineError:
        return PipelineError(f"{message}; got {height}x{width}{hint}", field="height" if bad_height else "width")

    bad = [isinstance(v, bool) or not isinstance(v, numbers.Real) or int(v) != v or v <= 0 for v in (height, width)]
    if any(bad):
        raise refuse(bad[0], "height and width must be positive integers")
    height, width = int(height), int(width)
    if height % s or width % s:
        raise refuse(bool(height % s), f"height and width must be multiples of the VAE scale factor {s}")
    lo, hi = limits.min_image, limits.max_image
    if not (lo <= height <= hi and lo <= width <= hi):
        raise refuse(not lo <= height <= hi, f"height and width must be within the engine's image range [{lo}, {hi}] "
                     "pixels", " (rebuild the engine folder with a wider shape range)")
    return height, width


def _seeds(seed: Any, batch: int) -> tuple[int, ...]:
    if seed is None:
        seed = secrets.randbits(32)
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise PipelineError(f"seed: got a list of {len(seed)} seeds for {batch} images")
        seeds = list(seed)
    else:
        seeds = [seed]
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0:
            raise PipelineError(f"seeds must be non-negative integers; got {seed!r}")
    if not isinstance(seed, (list, tuple)):
        seeds = [int(seed) + i for i in range(batch)]
    return tuple(int(s) for s in seeds)


def _explicit(arr: Any, shape: tuple[int, ...], what: str) -> np.ndarray | None:
    """An explicit noise array as a private read-only float32 copy of `shape` (a missing batch axis
    is added for batch 1)."""
    if arr is None:
        return None
    try:
        a = np.array(arr, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"{what} must be a float array of shape {list(shape)}: {e}") from e
    if a.ndim == len(shape) - 1 and shape[0] == 1:
        a = a[None]
    if a.shape != shape:
        raise PipelineError(f"{what} must have shape {list(shape)} (batch, channels, latent height, "
                            f"latent width); got {list(a.shape)}")
    return _frozen(a)


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a
