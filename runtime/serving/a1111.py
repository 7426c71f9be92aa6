"""AUTOMATIC1111's `/sdapi/v1` wire format: pydantic models of its txt2img and img2img requests
(field names, types and defaults of A1111 v1.10's modules/api/models.py, which derives them from
modules/processing.py), and their translation into our pipeline's settings.

Every field A1111 documents is declared. A field we do not implement is accepted only at a value
that cannot change the image (its A1111 default, or a value that has no effect with the other
fields, e.g. the hires-fix settings while `enable_hr` is false); any other value is a `WireError`
naming the field (HTTP 422). Fields A1111 does not know are refused too (extra="forbid"), since we
cannot tell whether they would change the image. Our own extensions live under `sd_runtime`.

Defaults that differ, on purpose: `width`/`height` default to the engine folder's size (A1111's
512 is SD 1.x's, which the folder's default equals for SD 1.x); the sampler defaults to A1111's
"Euler" (its `sampler_index` default). Seeds follow A1111: image i of a request uses seed + i, and
-1 draws one. Our images are not A1111's: its random numbers come from torch, ours from NumPy's
PCG64 (runtime/pipeline.py), so one seed gives a different image there.
"""

from __future__ import annotations

import math
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from runtime import handover
from runtime.errors import PipelineError
from runtime.imaging.inpainting import MASKED_CONTENT  # A1111's inpainting_fill 0..3, by name
from runtime.sampling import names as sampler_names
from runtime.scheduler import REGISTRY
from runtime.request import Limits
from runtime.text import lora_tags
from runtime.text.styles import StyleBook

from . import a1111_variation as variation
from . import controlnet, hires_wire
from .codec import WireError, decode_image, prepare_mask

__all__ = ["Extension", "Img2ImgRequest", "ImageResponse", "ProgressResponse", "Txt2ImgRequest", "job_settings"]

MAX_SEED = 2**63 - 1


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Extension(_Wire):
    """Our extensions to A1111's request (the `sd_runtime` field)."""

    guidance_rescale: float = Field(0.0, description="guidance rescale phi (arXiv:2305.08891, 3.4)")
    cache_interval: int | None = Field(None, description="step caching (DeepCache): a full U-Net call every "
                                                         "N steps; needs a folder built with --step-cache")
    cache_schedule: str | None = Field(None, description="which steps run the full U-Net: 'uniform' (every N) "
                                                         "or 'nonuniform' (DeepCache's: more full steps early)")


class Txt2ImgRequest(_Wire):
    """POST /sdapi/v1/txt2img (A1111 StableDiffusionProcessingTxt2Img + its API fields)."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = Field(None, description="default: the engine folder's size (512 for SD 1.x)")
    height: int | None = Field(None, description="default: the engine folder's size (512 for SD 1.x)")
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str | None = None
    sampler_index: str = "Euler"
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None
    sd_runtime: Extension | None = Field(None, description="sd-runtime's extensions (docs/serving.md)")


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img (A1111 StableDiffusionProcessingImg2Img + its API fields)."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class ImageResponse(BaseModel):
    """A1111's TextToImageResponse / ImageToImageResponse."""

    images: list[str] | None = Field(None, description="base64 PNG images")
    parameters: dict[str, Any]
    info: str = Field(description="JSON of A1111's Processed.js(): seeds, infotexts, ...")


class ProgressResponse(BaseModel):
    """GET /sdapi/v1/progress."""

    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None


# --- fields we accept only at values that cannot change the image -----------------------------------------

_NOT_IMPLEMENTED = "is not implemented by this server"


def _refuse_unsupported(req: Txt2ImgRequest) -> None:  # long: one check per A1111 field, in A1111's order
    checks = [
        ("restore_faces", not req.restore_faces, f"face restoration {_NOT_IMPLEMENTED} (it needs weights we do "
                                                 "not ship); send false"),
        ("s_min_uncond", req.s_min_uncond in (None, 0), f"s_min_uncond {_NOT_IMPLEMENTED} (send 0)"),
        ("s_churn", req.s_churn in (None, 0), f"s_churn {_NOT_IMPLEMENTED} (send 0)"),
        ("s_noise", req.s_noise in (None, 1), f"s_noise {_NOT_IMPLEMENTED} (send 1)"),
        ("firstpass_image", not req.firstpass_image, f"firstpass_image {_NOT_IMPLEMENTED}; send null"),
        ("script_name", not req.script_name,
         f"scripts are not available on this server ({req.script_name!r}); send null"),
        ("save_images", not req.save_images, "this server writes no files; send false"),
        ("infotext", not req.infotext, f"infotext {_NOT_IMPLEMENTED}; send the settings as fields"),
        ("disable_extra_networks", not (req.disable_extra_networks and lora_tags.has_tags(req.prompt)),
         "LoRA tags are honoured here by the folder built with them (a LoRA is fused at build time, it cannot be "
         "switched off); remove the tags from the prompt or send false"),
    ]
    for name, ok, message in checks:
        if not ok:
            raise WireError(name, message)
    controlnet.script_units(req.alwayson_scripts)  # ControlNet's units: _controlnet; any other script refused
    if isinstance(req, Img2ImgRequest):
        _refuse_img2img(req)


def refiner(req: Txt2ImgRequest) -> tuple[str, float] | None:
    """(the refiner checkpoint's name, the switch point) when the request names a refiner (A1111 v1.10
    modules/processing_scripts/refiner.py: none for null, "" and "None"), else None. The switch point
    defaults to 0.8 (A1111's "Switch at" default; runtime/handover.py DEFAULT_SWITCH) and must lie in
    (0, 1); the refiner folder must be served (runtime/serving/app.py refuses it otherwise, naming it).
    The hand-over is diffusers' (denoising_end / denoising_start on the timesteps), not A1111's swap of
    the model inside one sampler run: the same split of the steps, the sampler's history restarting."""
    if req.refiner_checkpoint in (None, "", "None"):
        return None
    switch = handover.DEFAULT_SWITCH if req.refiner_switch_at is None else req.refiner_switch_at
    if not 0.0 < switch < 1.0:
        raise WireError("refiner_switch_at", f"must be in (0, 1) (the fraction of the steps the checkpoint runs "
                                             f"before the refiner); got {req.refiner_switch_at}")
    if req.enable_hr:
        raise WireError("refiner_checkpoint", f"a refiner with the hires fix {_NOT_IMPLEMENTED}; send one of them")
    if controlnet.script_units(req.alwayson_scripts)[1]:
        raise WireError("refiner_checkpoint", f"a refiner with ControlNet units {_NOT_IMPLEMENTED}; send one of them")
    return req.refiner_checkpoint, float(switch)


def _refiner_settings(req: Txt2ImgRequest, mode: str) -> dict[str, Any]:
    """The checkpoint's part of a refiner hand-over: it stops at the switch point with its latents
    (runtime/serving/app.py runs the refiner on them); nothing without a refiner."""
    wanted = refiner(req)
    if wanted is None:
        return {}
    if mode == "inpaint":
        raise WireError("refiner_checkpoint", f"a refiner with inpainting {_NOT_IMPLEMENTED}; send null")
    return {"denoising_end": wanted[1], "output_type": "latent"}


def _refuse_img2img(req: Img2ImgRequest) -> None:
    if req.latent_mask:
        raise WireError("latent_mask", f"a separate latent mask {_NOT_IMPLEMENTED}; send null (the mask serves as "
                                       "the latent mask, as in A1111)")


# override_settings.sd_vae values: A1111's "Automatic" / "None" (the checkpoint's own VAE) run the
# folder's VAE; these names run its tiny one (TAESD, build-engine --tiny-vae; GET /sdapi/v1/sd-vae lists it
# under the first), refused by the request layer, as `override_settings.sd_vae`, where the folder has none
FULL_VAE_NAMES = ("Automatic", "None")
TINY_VAE_NAMES = ("taesd", "tiny")


def check_override_settings(settings: dict[str, Any] | None, model_titles: tuple[str, ...] | None = None) -> None:
    """A1111's override_settings: only settings that leave the image as it is, `sd_vae` (the
    folder's VAE or its tiny one) and `sd_model_checkpoint` (which folder: the server picks it,
    runtime/serving/models.py; checked here against `model_titles` when given)."""
    allowed = {"CLIP_stop_at_last_layers": (1,), "eta_noise_seed_delta": (0,), "samples_format": ("png",),
               "sd_vae": FULL_VAE_NAMES + TINY_VAE_NAMES, "enable_pnginfo": (True, False)}
    for key, value in (settings or {}).items():
        if key == "sd_model_checkpoint":
            if model_titles is not None and value not in model_titles:
                raise WireError(f"override_settings.{key}", f"model {value!r} is not served here; "
                                                            f"this server serves {model_titles[0]!r}")
        elif key not in allowed or value not in allowed[key]:
            raise WireError(f"override_settings.{key}", f"cannot be set to {value!r} on this server")


# --- translation ---------------------------------------------------------------------------------------------

def _sampler(req: Txt2ImgRequest, limits: Limits) -> tuple[str, bool]:
    name = req.sampler_name or req.sampler_index
    try:
        sampler, karras = sampler_names.from_a1111(name, req.scheduler)
    except sampler_names.SamplerNameError as e:
        raise WireError("sampler_name", str(e)) from None
    if sampler not in limits.samplers:
        raise WireError("sampler_name", f"{name!r} ({sampler}) is not available for this engine folder")
    return sampler, karras


def _eta(req: Txt2ImgRequest, sampler: str) -> float:
    """A1111's `eta`: the eta of the samplers whose registry record takes one (DDIM's eta, TCD's
    gamma; default 0, checked by the request layer) and the ancestral samplers' (default 1, the only
    value our euler_a runs); the other samplers ignore it."""
    if REGISTRY[sampler].eta_max > 0:
        return 0.0 if req.eta is None else float(req.eta)
    if sampler == "euler_a" and req.eta not in (None, 1):
        raise WireError("eta", f"the ancestral sampler runs with eta 1 here; got {req.eta}")
    return 0.0


def _size(req: Txt2ImgRequest, limits: Limits) -> tuple[int, int]:
    """(width, height): the request's, or the folder's default size for a side it leaves out (A1111
    clients send both). Checked against the folder by the request layer (runtime/request.py)."""
    dh, dw = limits.default_size
    return (req.width if req.width is not None else dw), (req.height if req.height is not None else dh)


# The request layer's fields (runtime/request.py PipelineError.field) under their A1111 wire names.
FIELDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "scheduler": "sampler_name",
          "cache_interval": "sd_runtime.cache_interval",
          "cache_schedule": "sd_runtime.cache_schedule", "height": "height", "width": "width",
          "num_images_per_prompt": "batch_size", "subseed": "subseed", "subseed_strength": "subseed_strength",
          "masked_content": "inpainting_fill", "padding_mask_crop": "inpaint_full_res_padding", "mask_blur": "mask_blur",
          "soft_mask": "mask_round", "initial_noise_multiplier": "initial_noise_multiplier", "mask_image": "mask",
          **hires_wire.FIELDS, "tiling": "tiling", "eta": "eta", "vae": "override_settings.sd_vae",
          **controlnet.FIELDS}


def _counts(req: Txt2ImgRequest, limits: Limits, max_steps: int, max_n_iter: int) -> None:
    if not 1 <= req.steps <= max_steps:
        raise WireError("steps", f"{req.steps} is outside [1, {max_steps}]")
    if req.batch_size < 1:
        raise WireError("batch_size", f"{req.batch_size} is below 1")
    if not 1 <= req.n_iter <= max_n_iter:
        raise WireError("n_iter", f"{req.n_iter} is outside [1, {max_n_iter}]")
    if not math.isfinite(req.cfg_scale):
        raise WireError("cfg_scale", "must be a finite number")
    if not -1 <= req.seed <= MAX_SEED:
        raise WireError("seed", f"{req.seed}: use -1 for a random seed, else 0 to {MAX_SEED}")


def _extension(req: Txt2ImgRequest) -> dict[str, Any]:
    """Our namespaced extension's fields as `Pipeline.request` keywords (checked there: a folder
    without the step-cache graphs refuses cache_interval, named `sd_runtime.cache_interval`)."""
    ext = req.sd_runtime or Extension()
    out: dict[str, Any] = {"guidance_rescale": ext.guidance_rescale}
    if ext.cache_interval is not None:
        out["cache_interval"] = ext.cache_interval
    if ext.cache_schedule is not None:
        out["cache_schedule"] = ext.cache_schedule
    return out


def _tiling(req: Txt2ImgRequest) -> dict[str, Any]:
    """A1111's `tiling` (modules/processing.py `process_images_inner`: `apply_circular(p.tiling)`,
    circular padding in every Conv2d): the pipeline's `tiling`, which needs a folder built with
    `build-engine --tiling` (refused there, naming `tiling`, otherwise). None and false: off."""
    return {"tiling": True} if req.tiling else {}


def _spacing(req: Txt2ImgRequest) -> dict[str, Any]:
    """The timestep spacing A1111's schedule type asks for ("SGM Uniform": trailing;
    runtime/sampling/names.py SPACING_SCHEDULES), else none (the folder's)."""
    spacing = sampler_names.spacing_from_a1111(req.sampler_name or req.sampler_index, req.scheduler)
    return {} if spacing is None else {"timestep_spacing": spacing}


def _vae(req: Txt2ImgRequest) -> dict[str, Any]:
    """override_settings.sd_vae (checked by `check_override_settings`): "taesd" / "tiny" run the
    folder's tiny VAE; "Automatic", "None" or none its own."""
    return {"vae": "tiny"} if (req.override_settings or {}).get("sd_vae") in TINY_VAE_NAMES else {}


def _recommended(req: Txt2ImgRequest, limits: Limits) -> Txt2ImgRequest:
    """`req` with an LCM / Turbo folder's recommended steps, cfg_scale and sampler (manifest "defaults";
    runtime/sampling/defaults.py) for those it does not send; A1111's defaults (50, 7.0, "Euler") stay
    for folders that recommend nothing. What the client sends always wins."""
    if limits.default_steps is None and limits.default_guidance is None:
        return req
    sent, update = req.model_fields_set, {}
    if "steps" not in sent and limits.default_steps is not None:
        update["steps"] = limits.default_steps
    if "cfg_scale" not in sent and limits.default_guidance is not None:
        update["cfg_scale"] = limits.default_guidance
    if not sent & {"sampler_name", "sampler_index"}:
        update["sampler_name"] = sampler_names.to_a1111(limits.default_sampler, False)[0]
    return req.model_copy(update=update)


def job_settings(req: Txt2ImgRequest, limits: Limits, *, max_steps: int, max_n_iter: int,
                 styles: StyleBook | None = None, controlnets: tuple[str, ...] = ()
                 ) -> tuple[str, list[dict[str, Any]]]:
    """(mode, one `Pipeline.request` keyword set per engine job: n_iter jobs of batch_size images).
    `styles`: the server's styles.csv (runtime/text/styles.py), applied to the prompts first;
    `controlnets`: the folder's ControlNet names (Pipeline.controlnets), for the ControlNet units.
    Raises WireError naming the first field that cannot be served."""
    _refuse_unsupported(req)
    req = _recommended(_styled(req, styles), limits)
    sampler, karras = _sampler(req, limits)
    width, height = hires_wire.first_pass_size(req, _size(req, limits), img2img=isinstance(req, Img2ImgRequest))
    _counts(req, limits, max_steps, max_n_iter)
    base = dict(negative_prompt=req.negative_prompt, height=height, width=width, num_inference_steps=req.steps,
                guidance_scale=float(req.cfg_scale), scheduler=sampler, karras=karras, eta=_eta(req, sampler),
                **_extension(req), **_tiling(req), **_vae(req), **_spacing(req))
    mode, prompt, images, per_prompt = "txt2img", req.prompt, {}, req.batch_size
    if isinstance(req, Img2ImgRequest):
        mode, prompt, images, per_prompt = _images(req, width, height)
        base["strength"] = float(req.denoising_strength)
    elif req.enable_hr:
        base["hires"] = hires_wire.hires_fix(req)
    base.update(_controlnet(req, (width, height), controlnets, images))
    base.update(_refiner_settings(req, mode))
    seed = secrets.randbits(32) if req.seed == -1 else req.seed
    n = per_prompt * (len(prompt) if isinstance(prompt, list) else 1)
    return mode, [dict(base, **images, prompt=prompt, num_images_per_prompt=per_prompt, **seeds)
                  for seeds in variation.job_seeds(req, limits, seed, n)]


def _controlnet(req: Txt2ImgRequest, size: tuple[int, int], controlnets: tuple[str, ...],
                images: dict[str, Any]) -> dict[str, Any]:
    """The ControlNet units of `alwayson_scripts` as pipeline keywords (runtime/serving/controlnet.py);
    img2img's first init image is the input of a unit without one, as the extension's."""
    key, args = controlnet.script_units(req.alwayson_scripts)
    init = images.get("image")
    init = (init[0] if isinstance(init, list) else init, req.resize_mode) if init is not None else None
    region = None
    if images.get("padding_mask_crop") is not None:  # "only masked": the control input is cropped as the image
        mask = images["mask_image"]
        region = controlnet.only_masked_region(mask[0] if isinstance(mask, list) else mask, images["mask_blur"],
                                               images["padding_mask_crop"], size)
    out = controlnet.unit_kwargs(args, controlnets, size, init_image=init, key=key or controlnet.SCRIPT,
                                 region=region)
    if out and req.enable_hr and not isinstance(req, Img2ImgRequest):
        raise WireError("enable_hr", "ControlNet units with the hires fix are not implemented; send false")
    return out


def _styled(req: Txt2ImgRequest, styles: StyleBook | None) -> Txt2ImgRequest:
    """The request with its `styles` applied to prompt and negative prompt (A1111 setup_prompts)."""
    if not req.styles:
        return req
    if styles is None:
        raise WireError("styles", "this server has no styles file (start it with serve --styles FILE); "
                                  "send [] and put the text in the prompt")
    try:
        prompt, negative = styles.apply(req.prompt, req.negative_prompt, req.styles)
    except PipelineError as e:
        raise WireError("styles", str(e)) from None
    return req.model_copy(update={"prompt": prompt, "negative_prompt": negative})


def _images(req: Img2ImgRequest, width: int, height: int) -> tuple[str, Any, dict[str, Any], int]:
    """(mode, prompt or one prompt per image, image/mask keywords, images per prompt), by A1111's
    rule: one init image is used for every image of the batch; several give one image each."""
    if not req.init_images:
        raise WireError("init_images", "img2img needs at least one init image")
    if len(req.init_images) > req.batch_size and len(req.init_images) > 1:
        raise WireError("init_images", f"{len(req.init_images)} images for batch_size {req.batch_size}; "
                                       "send at most batch_size images")
    images = [decode_image(x, f"init_images[{i}]").convert("RGB") for i, x in enumerate(req.init_images)]
    if len({im.size for im in images}) > 1:
        raise WireError("init_images", f"the images differ in size: {sorted({im.size for im in images})}")
    if req.resize_mode != 0 and images[0].size != (width, height):
        raise WireError("resize_mode", f"resize mode {req.resize_mode} {_NOT_IMPLEMENTED} for an image of another "
                                       f"size ({images[0].width}x{images[0].height} -> {width}x{height}); send 0")
    out: dict[str, Any] = {"image": images[0] if len(images) == 1 else images}
    mode = "img2img"
    if req.mask:
        mask = decode_image(req.mask, "mask")
        if mask.size != images[0].size:
            raise WireError("mask", f"the mask is {mask.width}x{mask.height} but init_images[0] is "
                                    f"{images[0].width}x{images[0].height}; they must have the same size")
        out["mask_image"] = prepare_mask(mask, invert=bool(req.inpainting_mask_invert), round_alpha=req.mask_round)
        out.update(_inpainting(req))
        mode = "inpaint"
    if req.initial_noise_multiplier is not None:  # A1111: None is opts.initial_noise_multiplier, 1 by default
        out["initial_noise_multiplier"] = float(req.initial_noise_multiplier)
    if len(images) == 1:
        return mode, req.prompt, out, req.batch_size
    if "mask_image" in out:
        out["mask_image"] = [out["mask_image"]] * len(images)
    return mode, [req.prompt] * len(images), out, 1


def _inpainting(req: Img2ImgRequest) -> dict[str, Any]:
    """A1111's inpainting fields as the pipeline's A1111 inpainting keywords (runtime/imaging/inpainting.py)."""
    if not 0 <= req.inpainting_fill < len(MASKED_CONTENT):
        raise WireError("inpainting_fill", f"{req.inpainting_fill}: send 0 (fill), 1 (original), 2 (latent noise) "
                                           "or 3 (latent nothing)")
    blur = (req.mask_blur, req.mask_blur) if req.mask_blur is not None else (req.mask_blur_x, req.mask_blur_y)
    for name, value in zip(("mask_blur_x", "mask_blur_y"), blur):
        if value < 0:
            raise WireError("mask_blur" if req.mask_blur is not None else name, f"{value}: send 0 or more pixels")
    if req.inpaint_full_res and req.inpaint_full_res_padding < 0:
        raise WireError("inpaint_full_res_padding", f"{req.inpaint_full_res_padding}: send 0 or more pixels")
    return dict(masked_content=MASKED_CONTENT[req.inpainting_fill], mask_blur=blur, soft_mask=not req.mask_round,
                padding_mask_crop=req.inpaint_full_res_padding if req.inpaint_full_res else None)


def processed_info(req: Txt2ImgRequest, results: list[Any], infotexts: list[str], *, model_name: str,
                   model_hash: str | None, inpainting: bool, extra: dict[str, Any]) -> dict[str, Any]:
    """A1111's `Processed.js()` for a finished request (the `info` JSON string's object), plus our
    namespaced `sd_runtime` entry (`extra`)."""
    first = results[0].parameters
    seeds = [s for r in results for s in r.seeds]
    prompts = [p for r in results for p in _per_image(r.parameters["prompt"], len(r.seeds))]
    negatives = [p for r in results for p in _per_image(r.parameters["negative_prompt"], len(r.seeds))]
    sampler, schedule = sampler_names.to_a1111(first["scheduler"], bool(first.get("karras")))
    return {
        "prompt": prompts[0], "all_prompts": prompts, "negative_prompt": negatives[0],
        "all_negative_prompts": negatives, "seed": seeds[0], "all_seeds": seeds,
        **variation.info_fields(req, results), "width": first["width"], "height": first["height"],
        "sampler_name": sampler, "cfg_scale": first["guidance_scale"], "steps": first["steps"],
        "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model_name, "sd_model_hash": model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "denoising_strength": (first.get("strength") if first.get("mode") != "txt2img"
                               else first.get("hires", {}).get("strength")),
        "extra_generation_params": {"Schedule type": schedule, **hires_wire.extra_params(first)},
        "index_of_first_image": 0,
        "infotexts": infotexts, "styles": req.styles or [], "job_timestamp": extra.pop("job_timestamp", ""),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": inpainting, "version": "sd-runtime",
        "sd_runtime": extra,
    }


def _per_image(value: Any, n: int) -> list[str]:
    """A result's prompt (one string, or one per prompt with images_per_prompt each) per image."""
    if isinstance(value, str):
        return [value] * n
    per = n // len(value)
    return [p for p in value for _ in range(per)]
