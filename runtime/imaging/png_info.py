"""AUTOMATIC1111's `parameters` PNG text chunk ("infotext"): write it from a generation's
parameters, read it back.

The format (A1111 modules/processing.py `create_infotext`, v1.10):

    a red barn, snow
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 6ce0161689

the prompt (any number of lines), then the negative prompt after "Negative prompt: " (left out
when empty), then one line of "Key: value" pairs separated by ", ". A value holding ",", ":" or a
newline is written as a JSON string (modules/infotext_utils.py `quote`). Reading follows
`parse_generation_parameters`: the last line is the parameter line only if it has at least 3
"Key: value" pairs; the lines before "Negative prompt:" form the prompt; quoted values are
unquoted; "Size: WxH" becomes "Size-1" (width) and "Size-2" (height). Lines are stripped of
surrounding white space on both sides, as A1111 does, so the prompt's own leading or trailing
white space is not kept (our `sd-runtime` JSON chunk keeps it exactly).

Fields we write: Steps, Sampler, Schedule type (runtime/sampling/names.py), CFG scale, Seed, Size,
Model hash (the first 10 hex digits of the source checkpoint's sha256, which is A1111's "Model
hash" for a single-file checkpoint), Model, Denoising strength (img2img, inpaint), Eta DDIM (when
not 0, A1111's key for DDIM's eta), CFG Rescale (when not 0, the key of the CFG-Rescale extension
for A1111), Variation seed, Variation seed strength and Seed resize from (runtime/sampling/variation.py),
Tiling (when on) and Version. What an A1111 PNG carries and we cannot honour (Clip skip > 1, hires
fix, other samplers; variation seeds, which the command line does not take) is reported by
`settings_from_fields`, not silently dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from runtime.sampling import names as sampler_names

__all__ = ["PARAMETERS_KEY", "format_infotext", "infotext_from_parameters", "parse_infotext", "quote",
           "settings_from_fields", "unquote"]

PARAMETERS_KEY = "parameters"  # the tEXt key A1111 writes (modules/images.py save_image_with_geninfo)
VERSION = "sd-runtime 0.1.0"
# A1111 modules/infotext_utils.py: `re_param_code` and `re_imagesize`
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"
# Fields with a counterpart in our settings, read by `settings_from_fields`
_KNOWN = ("Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size-1",
          "Size-2", "Denoising strength", "Eta DDIM", "CFG Rescale", "CFG Rescale φ", "Model hash",
          "Model", "Version", "Tiling")
# Fields that only restate A1111's defaults (parse_generation_parameters fills some of them in)
_DEFAULTS = {"Clip skip": "1", "RNG": "GPU", "ENSD": "0", "Schedule max sigma": "0", "Schedule min sigma": "0",
             "Schedule rho": "0", "VAE Encoder": "Full", "VAE Decoder": "Full", "FP8 weight": "Disable"}


def quote(value: Any) -> str:
    """A1111's `quote`: a JSON string if the value holds ',', ':' or a newline, else as is."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    """A1111's `unquote`: the JSON string's value, or the text unchanged if it is not one."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, str) else text


def format_infotext(prompt: str, negative_prompt: str, fields: Mapping[str, Any]) -> str:
    """A1111's infotext: prompt, "Negative prompt: ..." if any, and the fields whose value is not
    None, in order (a field whose value equals its key is written as the key alone, as A1111)."""
    pairs = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in fields.items() if v is not None)
    negative = f"\n{_NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{pairs}".strip()


def parse_infotext(infotext: str) -> dict[str, str]:
    """A1111's `parse_generation_parameters`, without its UI defaults: {"Prompt", "Negative prompt",
    and every "Key: value" of the parameter line, unquoted; "Size" as "Size-1"/"Size-2"}."""
    *lines, last = infotext.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            negative.append(line[len(_NEGATIVE):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        value = unquote(value) if value[:1] == '"' and value[-1:] == '"' else value
        size = _IMAGE_SIZE.match(value)
        if size:
            fields[f"{key}-1"], fields[f"{key}-2"] = size.group(1), size.group(2)
        else:
            fields[key] = value
    return fields


def infotext_from_parameters(params: Mapping[str, Any], *, seed: int | None = None, karras: bool | None = None,
                             model_hash: str | None = None, model_name: str | None = None,
                             subseed: int | None = None) -> str:
    """The infotext of one image from our generation parameters (`GenerationResult.parameters`,
    or the CLI's metadata). `seed`: this image's (default params["seed"], else the first of
    params["seeds"]); `karras`: whether Karras sigmas were used (default params["karras"], None
    counting as False; pass the resolved value when the engine's scheduler config decides);
    `model_hash`: the source checkpoint's sha256 (its first 10 hex digits are written); `subseed`:
    this image's variation seed (default the first of params["subseeds"]; written, with "Variation
    seed strength", only when params["subseed_strength"] is not 0, and "Seed resize from" WxH when
    params has seed_resize_from, as A1111's create_infotext)."""
    prompt, negative = params["prompt"], params.get("negative_prompt") or ""
    if not isinstance(prompt, str) or not isinstance(negative, str):
        raise ValueError("an infotext describes one image: pass parameters with one prompt and one negative prompt")
    if seed is None:
        seed = params["seed"] if "seed" in params else params["seeds"][0]
    karras = bool(params.get("karras")) if karras is None else karras
    sampler, schedule = sampler_names.to_a1111(params["scheduler"], karras)
    spacing = params.get("timestep_spacing")  # a request's own; A1111's "SGM Uniform" is "trailing"
    schedule = next((label for label, s in sampler_names.SPACING_SCHEDULES.items() if s == spacing), schedule)
    fields = {
        "Steps": params["steps"], "Sampler": sampler, "Schedule type": schedule,
        "CFG scale": params["guidance_scale"], "Seed": seed, "Size": f"{params['width']}x{params['height']}",
        "Model hash": model_hash[:10] if model_hash else None, "Model": model_name or None,
        **_variation_fields(params, subseed),
        "Denoising strength": params.get("strength") if params.get("mode", "txt2img") != "txt2img" else None,
        "Eta DDIM": params.get("eta") or None, "CFG Rescale": params.get("guidance_rescale") or None,
        "Tiling": "True" if params.get("tiling") else None,  # A1111 create_infotext's "Tiling"
        # A1111 v1.10 modules/processing_scripts/refiner.py extra_generation_params: "Refiner" (the checkpoint's
        # title; here the refiner folder's name) and "Refiner switch at" (runtime/handover.py)
        "Refiner": PurePath(params["refiner"]).name if params.get("refiner") else None,
        "Refiner switch at": params.get("refiner_switch_at"),
        "Version": VERSION,
    }
    if params.get("hires"):  # A1111's hires-fix fields (runtime/hires.py infotext_fields)
        fields = {**{k: v for k, v in fields.items() if k != "Version"}, **hires_infotext(params), "Version": VERSION}
    return format_infotext(prompt, negative, fields)


def _variation_fields(params: Mapping[str, Any], subseed: int | None) -> dict[str, Any]:
    """A1111 create_infotext's "Variation seed", "Variation seed strength" (when the strength is not
    0) and "Seed resize from" (width x height) of our parameters (runtime/sampling/variation.py)."""
    strength, resize = params.get("subseed_strength") or 0, params.get("seed_resize_from")
    return {"Variation seed": (subseed if subseed is not None else params["subseeds"][0]) if strength else None,
            "Variation seed strength": strength or None,
            "Seed resize from": f"{resize[1]}x{resize[0]}" if resize else None}


def settings_from_fields(fields: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Our settings from parsed infotext fields, keyed as our parameters (prompt, negative_prompt,
    steps, guidance_scale, seed, width, height, scheduler, karras, strength, eta,
    guidance_rescale; only those present; "model" names the checkpoint, for information), and the
    "Key: value" fields we cannot honour."""
    out: dict[str, Any] = {"prompt": fields.get("Prompt", ""), "negative_prompt": fields.get("Negative prompt", "")}
    conversions = (("Steps", "steps", int), ("CFG scale", "guidance_scale", float), ("Seed", "seed", int),
                   ("Size-1", "width", int), ("Size-2", "height", int), ("Denoising strength", "strength", float),
                   ("Eta DDIM", "eta", float), ("CFG Rescale", "guidance_rescale", float),
                   ("CFG Rescale φ", "guidance_rescale", float))
    for key, name, kind in conversions:
        if key in fields:
            try:
                out[name] = kind(fields[key])
            except ValueError:
                raise ValueError(f"infotext field {key}: {fields[key]!r} is not a valid {kind.__name__}") from None
    if "Sampler" in fields:
        out["scheduler"], out["karras"] = sampler_names.from_a1111(fields["Sampler"], fields.get("Schedule type"))
        spacing = sampler_names.spacing_from_a1111(fields["Sampler"], fields.get("Schedule type"))
        if spacing is not None:  # "SGM Uniform": trailing
            out["timestep_spacing"] = spacing
    if fields.get("Tiling") == "True":  # A1111 writes it only when on
        out["tiling"] = True
    if "Model" in fields or "Model hash" in fields:  # which checkpoint: for the user to find its engine folder
        out["model"] = f"{fields.get('Model', '?')} [{fields.get('Model hash', '?')}]"
    # e.g. "Eta" (the ancestral samplers' eta; ours is fixed at 1), "Clip skip: 2", "Hires upscale"
    ignored = [f"{k}: {v}" for k, v in fields.items() if k not in _KNOWN and _DEFAULTS.get(k) != v]
    return out, ignored


def hires_infotext(params: Mapping[str, Any]) -> dict[str, Any]:
    """A1111's infotext fields of a hires-fix image (processing.py StableDiffusionProcessingTxt2Img
    init / calculate_target_resolution): Denoising strength (the second pass's), Hires upscale or
    Hires resize, Hires steps, Hires upscaler."""
    hires = params["hires"]
    size = ({"Hires upscale": hires["scale"]} if "scale" in hires
            else {"Hires resize": f"{hires['resize_width']}x{hires['resize_height']}"})
    return {"Denoising strength": hires["strength"], **size, "Hires steps": hires["steps"],
            "Hires upscaler": hires["upscaler"]}
