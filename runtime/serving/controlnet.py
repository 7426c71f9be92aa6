"""The sd-webui-controlnet extension's API (Mikubill/sd-webui-controlnet at 56cec5b, 2024-07-25;
"the extension" below), which A1111 clients such as webuiapi speak:

    POST /sdapi/v1/txt2img | img2img   alwayson_scripts: {"controlnet": {"args": [unit, ...]}}
                                       (the key matched case-insensitively, as its is_cn_script)
    GET  /controlnet/version           scripts/api.py: {"version": 3} (external_code.get_api_version)
    GET  /controlnet/model_list        {"model_list": [name, ...]}: the folder's ControlNets
    GET  /controlnet/module_list       {"module_list": [...], "module_detail": {...}}: the
                                       preprocessors that need no weights (runtime/imaging/control.py)
    POST /controlnet/detect            a preprocessor over images: {"images": [base64 PNG], "info"}

A unit (internal_controlnet/args.py ControlNetUnit, field for field, with its legacy aliases
`input_image`, `lowvram`, `guidance`) becomes the pipeline's ControlNet keywords in `unit_kwargs`,
the one place: its image is preprocessed and fitted to the request size here as the extension does
(runtime/imaging/control.py), then passed as `control_image` with `controlnet`,
`controlnet_conditioning_scale` (the unit's `weight`), `control_guidance_start` / `_end` and
`guess_mode`, one list entry per enabled unit. A field we cannot honour is a WireError naming
`alwayson_scripts.controlnet.args[i].<field>` (422). Differences, on purpose: docs/serving.md.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime.errors import PipelineError
from runtime.imaging import control, inpainting
from runtime.imaging import images as imgs

from .codec import WireError, decode_image, encode_png, prepare_mask

__all__ = ["API_VERSION", "FIELDS", "ControlNetUnit", "DetectRequest", "detect", "detected_maps", "find_model",
           "module_list", "only_masked_region", "script_units", "unit_kwargs"]

API_VERSION = 3  # internal_controlnet/external_code.py get_api_version
SCRIPT = "controlnet"  # external_code.is_cn_script: the script's title, lowercased
MAX_WEIGHT = 2.0  # ControlNetUnit.weight: Field(ge=0.0, le=2.0)
# scripts/enums.py ControlMode, in the order of the ints older clients send (webuiapi maps 0..2 to these)
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
# The pipeline's ControlNet keywords (PipelineError.field) under the wire name of the units
FIELDS = {name: f"alwayson_scripts.{SCRIPT}.args" for name in
          ("control_image", "controlnet", "controlnet_conditioning_scale", "control_guidance_start",
           "control_guidance_end", "guess_mode", "control_resize_mode")}
LEGACY_ALIASES = {"input_image": "image", "lowvram": "low_vram", "guidance": "guidance_end"}  # legacy_field_alias


class ControlNetUnit(BaseModel):
    """One unit of `alwayson_scripts.controlnet.args` (the extension's ControlNetUnit). Fields for
    its UI, batch folders, AnimateDiff, IP-Adapter and PuLID are accepted where they cannot change
    the image (`_refuse`)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    image: Any = None
    mask: Any = None
    mask_image: Any = None  # SD Forge's name of `mask` (ControlNetUnit.mask_alias)
    resize_mode: str | int = "Crop and Resize"
    low_vram: bool = False
    processor_res: float = -1
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: str | int = "Balanced"
    inpaint_crop_input_image: bool = True
    hr_option: str | int = "Both"
    save_detected_map: bool = True
    advanced_weighting: list[float] | None = None
    effective_region_mask: Any = None
    pulid_mode: str = "Fidelity"
    union_control_type: str = "Unknown"
    ipadapter_input: Any = None
    is_ui: bool = False
    input_mode: str = "simple"
    batch_images: Any = None
    output_dir: str = ""
    loopback: bool = False
    batch_mask_dir: str | None = None
    animatediff_batch: bool = False
    batch_modifiers: list[Any] = Field(default_factory=list)
    batch_image_files: list[Any] = Field(default_factory=list)
    batch_keyframe_idx: str | list[Any] | None = None


def script_units(scripts: dict[str, Any]) -> tuple[str | None, list[Any]]:
    """(the key under which the ControlNet script's args came, or None; its args), from A1111's
    `alwayson_scripts`; raises a WireError for any other script."""
    key, args = None, []
    for name, value in (scripts or {}).items():
        if name.lower() != SCRIPT:
            raise WireError(f"alwayson_scripts.{name}", "scripts other than ControlNet are not available on this "
                                                        "server; send {}")
        if not isinstance(value, dict) or not isinstance(value.get("args", []), list) or set(value) - {"args"}:
            raise WireError(f"alwayson_scripts.{name}", 'send {"args": [unit, ...]}')
        key, args = name, value.get("args", [])
    return key, args


def _unit(raw: Any, where: str) -> ControlNetUnit:
    if not isinstance(raw, dict):
        raise WireError(where, "a ControlNet unit must be an object")
    values = dict(raw)
    for alias, name in LEGACY_ALIASES.items():
        if alias in values:
            if name in values:
                raise WireError(f"{where}.{alias}", f"send either {alias!r} or {name!r}")
            values[name] = values.pop(alias)
    if values.get("mask_image") is not None:
        if values.get("mask") is not None:
            raise WireError(f"{where}.mask_image", "send either 'mask' or 'mask_image'")
        values["mask"] = values.pop("mask_image")
    try:
        return ControlNetUnit(**values)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err.get("loc", ()))
        raise WireError(f"{where}.{field}" if field else where, err.get("msg", "invalid")) from None


def _refuse(unit: ControlNetUnit, where: str) -> None:
    """Fields accepted only where they cannot change the image."""
    checks = [("advanced_weighting", unit.advanced_weighting is None, "per-layer weights are not implemented; "
                                                                      "send null"),
              ("effective_region_mask", unit.effective_region_mask is None, "region masks are not implemented; "
                                                                            "send null"),
              ("ipadapter_input", unit.ipadapter_input is None, "IP-Adapter is not served here; send null"),
              ("input_mode", unit.input_mode == "simple", "batch and merge inputs read folders; send 'simple'"),
              ("animatediff_batch", not unit.animatediff_batch, "AnimateDiff is not served here; send false")]
    for name, ok, message in checks:
        if not ok:
            raise WireError(f"{where}.{name}", message)


def find_model(name: str, controlnets: tuple[str, ...]) -> str | None:
    """The served ControlNet a unit's `model` names: its name, case-insensitively, with or without
    the " [hash]" suffix the extension's model list carries ("control_v11p_sd15_canny [d14c016b]")."""
    bare = re.sub(r"\s*\[[0-9a-fA-F]+\]\s*$", "", name or "").strip().lower()
    return next((c for c in controlnets if c.lower() == bare), None)


def _check_numbers(unit: ControlNetUnit, where: str) -> None:
    for name, lo, hi in (("weight", 0.0, MAX_WEIGHT), ("guidance_start", 0.0, 1.0), ("guidance_end", 0.0, 1.0)):
        value = getattr(unit, name)
        if not lo <= value <= hi:  # NaN fails too
            raise WireError(f"{where}.{name}", f"{value} is outside [{lo}, {hi}] (the extension's bounds)")
    if unit.guidance_start >= unit.guidance_end:  # the extension refuses start > end; diffusers' check_inputs equal too
        raise WireError(f"{where}.guidance_start", f"{unit.guidance_start} is not before guidance_end "
                                                   f"{unit.guidance_end} (the pipeline needs start < end)")


def _control_mode(unit: ControlNetUnit, where: str) -> bool:
    """guess_mode for the unit's control mode: Balanced -> False; "ControlNet is more important"
    -> True (diffusers' guess mode; see docs/serving.md for how close it is)."""
    value = unit.control_mode
    mode = CONTROL_MODES[value] if isinstance(value, int) and 0 <= value < len(CONTROL_MODES) else value
    if mode == CONTROL_MODES[1]:
        raise WireError(f"{where}.control_mode", f"{mode!r} (soft weights on both prompt halves) is not "
                                                 "implemented; send 'Balanced' or 'ControlNet is more important'")
    if mode not in CONTROL_MODES:
        raise WireError(f"{where}.control_mode", f"{value!r}: send one of {', '.join(map(repr, CONTROL_MODES))}")
    return mode == CONTROL_MODES[2]


def _decode(value: Any, field: str) -> np.ndarray:
    """A base64 image as the extension's parse_image reads it: uint8, then HWC3 (RGB)."""
    return control.as_rgb(decode_image(value, field))


def _input_image(unit: ControlNetUnit, where: str, fallback: tuple[Image.Image, int] | None
                 ) -> tuple[np.ndarray, str] | None:
    """(RGB input, resize mode): the unit's image with its mask as alpha (get_input_images_rgba:
    a string, {"image", "mask"}, or [image, mask]); an alpha that is neither all <= 5 nor all >= 250
    is the input itself, as a grey scribble (Script.choose_input_image from_rgba_to_input). Without
    one, img2img's init image at A1111's own resize mode. None when there is neither."""
    image, mask = unit.image, unit.mask
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask")
    elif isinstance(image, (list, tuple)):
        if len(image) != 2 or isinstance(image[0], dict):
            raise WireError(f"{where}.image", "send one image: a string, {'image', 'mask'} or [image, mask]")
        image, mask = image
    mode = _resize_mode(unit.resize_mode, f"{where}.resize_mode")
    if image in (None, ""):
        if fallback is None:
            return None
        return control.as_rgb(fallback[0]), _resize_mode(fallback[1], "resize_mode")
    rgb = _decode(image, f"{where}.image")
    if mask in (None, ""):
        return rgb, mode
    alpha = _decode(mask, f"{where}.mask")[:, :, 0]
    if alpha.shape != rgb.shape[:2]:
        raise WireError(f"{where}.mask", f"the mask is {alpha.shape[1]}x{alpha.shape[0]}, the image "
                                         f"{rgb.shape[1]}x{rgb.shape[0]}")
    if (alpha <= 5).all() or (alpha >= 250).all():
        return rgb, mode
    return control.as_rgb(alpha), mode


def _resize_mode(value: str | int, field: str) -> str:
    try:
        return control.resize_mode(value)
    except ValueError as e:
        raise WireError(field, str(e)) from None


def only_masked_region(mask: Image.Image, blur: tuple[int, int], padding: int, size: tuple[int, int]
                       ) -> tuple[tuple[int, int, int, int], tuple[int, int]] | None:
    """(crop box, mask size (w, h)) of A1111's "only masked" inpainting for the mask as the server
    prepared it: blurred as the pipeline blurs it, its box grown by `padding` and to the request's
    aspect ratio (runtime/imaging/inpainting.py, as the pipeline crops). None for a blank mask (the
    pipeline refuses it)."""
    grey = np.asarray(prepare_mask(mask, invert=False, blur_x=blur[0], blur_y=blur[1]))
    box = inpainting.get_crop_region(grey, padding)
    if box is None:
        return None
    return inpainting.expand_crop_region(box, size[0], size[1], grey.shape[1], grey.shape[0]), grey.shape[::-1]


def _crop_to_region(rgb: np.ndarray, mode: str, region: tuple[tuple[int, int, int, int], tuple[int, int]],
                    size: tuple[int, int]) -> np.ndarray:
    """Script.try_crop_image_with_a1111_mask: the input resized to the mask's size by its resize mode
    (A1111's images.resize_image), cropped to the inpainting box, then resized to the request size
    by A1111's "Resize and Fill" (Lanczos in float here; A1111 resizes uint8 channels)."""
    (x1, y1, x2, y2), (w0, h0) = region
    resize = {"Just Resize": lambda x, w, h: imgs.load_image(x, h, w), "Crop and Resize": inpainting.crop_and_resize,
              "Resize and Fill": inpainting.resize_and_fill}[mode]
    whole = resize(rgb.astype(np.float32) / 255.0, w0, h0)
    out = inpainting.resize_and_fill(whole[y1:y2, x1:x2], *size)
    return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


def _control_map(unit: ControlNetUnit, rgb: np.ndarray, mode: str, size: tuple[int, int], where: str,
                 region: tuple[tuple[int, int, int, int], tuple[int, int]] | None = None) -> np.ndarray:
    """controlnet.py get_control for one image: the "only masked" crop, pixel-perfect resolution,
    preprocessor, fit."""
    width, height = size
    if region is not None and unit.inpaint_crop_input_image:
        rgb = _crop_to_region(rgb, mode, region, size)
    res = unit.processor_res
    if unit.pixel_perfect:
        res = control.pixel_perfect_resolution(rgb.shape[0], rgb.shape[1], height, width, mode)
    try:
        detected = control.preprocess(rgb, unit.module, res, unit.threshold_a, unit.threshold_b)
        return control.fit(detected, width, height, mode)
    except PipelineError as e:  # a map over the size limit (the image's fault), or OpenCV missing (the module's)
        raise WireError(f"{where}.{'image' if e.field == 'control_image' else 'module'}", str(e),
                        status=422 if e.field == "control_image" else 500) from None


def unit_kwargs(args: list[Any], controlnets: tuple[str, ...], size: tuple[int, int], *,
                init_image: tuple[Image.Image, int] | None = None, key: str = SCRIPT,
                region: tuple[tuple[int, int, int, int], tuple[int, int]] | None = None) -> dict[str, Any]:
    """The pipeline's ControlNet keywords for the units `args` at `size` (width, height): lists,
    one entry per enabled unit in order (disabled units skipped, as the extension), or {} for none.
    `init_image`: img2img's first init image and A1111 resize mode, the input of units without an
    image; `region`: "only masked" inpainting's crop (`only_masked_region`). Raises WireError naming
    alwayson_scripts.<key>.args[i].<field>."""
    out: dict[str, list[Any]] = {"control_image": [], "controlnet": [], "controlnet_conditioning_scale": [],
                                 "control_guidance_start": [], "control_guidance_end": []}
    guess: bool | None = None
    for i, raw in enumerate(args):
        where = f"alwayson_scripts.{key}.args[{i}]"
        unit = _unit(raw, where)
        if not unit.enabled:
            continue
        _refuse(unit, where)
        if control.find_preprocessor(unit.module) is None:
            raise WireError(f"{where}.module", f"{unit.module!r} is not available here; send one of "
                                               f"{', '.join(control.PREPROCESSORS)} (maps that need weights, "
                                               "such as depth or pose: send the map with module 'none')")
        name = find_model(unit.model, controlnets)
        if name is None:
            served = ", ".join(map(repr, controlnets)) or "none (build the folder with --controlnet)"
            raise WireError(f"{where}.model", f"ControlNet {unit.model!r} is not served here; served: {served}")
        _check_numbers(unit, where)
        unit_guess = _control_mode(unit, where)
        if guess is not None and unit_guess != guess:
            raise WireError(f"{where}.control_mode", "every unit must use the same control mode here "
                                                     "(guess mode applies to the whole image)")
        guess = unit_guess
        found = _input_image(unit, where, init_image)
        if found is None:
            raise WireError(f"{where}.image", "a ControlNet unit needs an image on txt2img")
        out["control_image"].append(_control_map(unit, *found, size, where, region))
        out["controlnet"].append(name)
        out["controlnet_conditioning_scale"].append(float(unit.weight))
        out["control_guidance_start"].append(float(unit.guidance_start))
        out["control_guidance_end"].append(float(unit.guidance_end))
    return {**out, "guess_mode": bool(guess)} if guess is not None else {}


def detected_maps(scripts: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """The control maps (base64 PNG) the extension appends to a request's `images` (Script.postprocess,
    unless its control_net_no_detectmap option): one per enabled unit whose `save_detected_map` is
    true, in order, from a job's settings (`unit_kwargs` made them, one per enabled unit)."""
    maps = settings.get("control_image") or []
    _, args = script_units(scripts)
    enabled = [unit for unit in (_unit(raw, "") for raw in args) if unit.enabled]
    return [encode_png(Image.fromarray(m)) for m, unit in zip(maps, enabled) if unit.save_detected_map]


# --- /controlnet/* (routes: controlnet_routes.py) --------------------------------------------------------

class DetectRequest(BaseModel):
    """POST /controlnet/detect (scripts/api.py detect's Body fields). `controlnet_images` is what
    webuiapi's controlnet_detect sends for `controlnet_input_images`."""

    model_config = ConfigDict(extra="forbid")

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_images: list[str] = Field(default_factory=list)
    controlnet_processor_res: float = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = Field(default_factory=list)
    low_vram: bool = False


def detect(req: DetectRequest) -> list[str]:
    """The preprocessor's map of each image, base64 PNG (masks are ignored: none of these
    preprocessors accepts one, as the extension warns)."""
    if control.find_preprocessor(req.controlnet_module) is None:
        raise WireError("controlnet_module", f"module {req.controlnet_module!r} not available; send one of "
                                             f"{', '.join(control.PREPROCESSORS)}")
    images = req.controlnet_input_images or req.controlnet_images
    if not images:
        raise WireError("controlnet_input_images", "no image selected")
    out = []
    for i, data in enumerate(images):
        rgb = _decode(data, f"controlnet_input_images[{i}]")
        try:
            detected = control.preprocess(rgb, req.controlnet_module, req.controlnet_processor_res,
                                          req.controlnet_threshold_a, req.controlnet_threshold_b)
        except PipelineError as e:
            if e.field != "control_image":
                raise  # OpenCV missing: the server's fault (500)
            raise WireError(f"controlnet_input_images[{i}]", str(e)) from None
        out.append(encode_png(Image.fromarray(detected)))
    return out


def module_list(alias_names: bool = False) -> dict[str, Any]:
    """external_code.get_modules / get_modules_detail over the preprocessors served here."""
    names = [p.label if alias_names else p.name for p in control.PREPROCESSORS.values()]
    detail = {(p.label if alias_names else p.name): {"model_free": False,
                                                     "sliders": [s.api_json() for s in p.sliders()]}
              for p in control.PREPROCESSORS.values()}
    return {"module_list": names, "module_detail": detail}
