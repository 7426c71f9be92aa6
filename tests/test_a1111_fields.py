"""docs/serving.md's table of AUTOMATIC1111 fields agrees with the request models and with what the
server does with each field (issue 28).

The table (between `<!-- a1111-fields -->` markers) has one row per field of the txt2img and
img2img request models, with a status per endpoint: "implemented" (the field changes what the
pipeline is asked for), "no-op" (accepted at any value: it cannot change the image) or "refused"
(accepted only at the value the row says to send; anything else is a 4xx naming the field). Each
status is checked against `a1111.job_settings`, the wire layer, with a probe value per field:
implemented fields must change the jobs' settings, no-op fields must leave them equal, refused
fields must raise a WireError naming them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runtime.request import Limits
from runtime.serving import a1111
from runtime.serving.codec import WireError
from runtime.text.styles import StyleBook
from test_serve_support import picture, png_b64

DOC = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
STATUSES = ("implemented", "no-op", "refused")
LIMITS = Limits(min_image=32, max_image=128, max_batch=4, vae_scale_factor=2, latent_channels=4,
                default_size=(64, 64), inpainting_unet=False, default_sampler="pndm",
                samplers=("euler", "euler_a", "ddim", "dpmpp_2m", "pndm", "lms", "heun", "unipc", "lcm"))
IMAGE = png_b64(picture(0))
MASK = png_b64(picture(1))
CONTROLNETS = ("canny",)  # the folder's ControlNets, for the alwayson_scripts probe
BASE = {"prompt": "a cat", "seed": 5, "subseed": 9, "steps": 4, "width": 64, "height": 64}
BASE_IMG2IMG = {**BASE, "init_images": [IMAGE]}

# A probe value per field (with any companion fields it needs to take effect), used on the
# endpoint(s) the table names. Fields whose effect is on the answer, not on the generation, are
# checked by the server tests named in RESPONSE_ONLY.
PROBES = {
    "prompt": {"prompt": "a dog"}, "negative_prompt": {"negative_prompt": "blurry"}, "styles": {"styles": ["warm"]},
    "seed": {"seed": 6}, "subseed": {"subseed": 10, "subseed_strength": 0.5},
    "subseed_strength": {"subseed_strength": 0.5},
    "seed_resize_from_h": {"seed_resize_from_h": 48, "seed_resize_from_w": 48},
    "seed_resize_from_w": {"seed_resize_from_w": 48, "seed_resize_from_h": 48},
    "sampler_name": {"sampler_name": "DDIM"}, "sampler_index": {"sampler_index": "DDIM"},
    "scheduler": {"sampler_name": "Euler", "scheduler": "Karras"}, "batch_size": {"batch_size": 2},
    "n_iter": {"n_iter": 2}, "steps": {"steps": 6}, "cfg_scale": {"cfg_scale": 5.0}, "width": {"width": 32},
    "height": {"height": 32}, "restore_faces": {"restore_faces": True}, "tiling": {"tiling": True},
    "do_not_save_samples": {"do_not_save_samples": True}, "do_not_save_grid": {"do_not_save_grid": True},
    "eta": {"sampler_name": "DDIM", "eta": 0.5}, "denoising_strength": {"denoising_strength": 0.4, "enable_hr": True},
    "s_min_uncond": {"s_min_uncond": 0.5}, "s_churn": {"s_churn": 0.5}, "s_tmax": {"s_tmax": 5.0},
    "s_tmin": {"s_tmin": 0.5}, "s_noise": {"s_noise": 0.9},
    "override_settings_restore_afterwards": {"override_settings_restore_afterwards": False},
    "refiner_checkpoint": {"refiner_checkpoint": "refiner"}, "refiner_switch_at": {"refiner_switch_at": 0.8},
    "disable_extra_networks": {"disable_extra_networks": True}, "firstpass_image": {"firstpass_image": IMAGE},
    "comments": {"comments": {"note": "x"}}, "enable_hr": {"enable_hr": True},
    # the old hires API needs both sides: probed together, against a baseline without either
    "firstphase_width": {"enable_hr": True, "firstphase_width": 32, "firstphase_height": 32},
    "firstphase_height": {"enable_hr": True, "firstphase_height": 32, "firstphase_width": 32},
    "hr_scale": {"enable_hr": True, "hr_scale": 1.5}, "hr_upscaler": {"enable_hr": True, "hr_upscaler": "Lanczos"},
    "hr_second_pass_steps": {"enable_hr": True, "hr_second_pass_steps": 2},
    "hr_resize_x": {"enable_hr": True, "hr_resize_x": 96}, "hr_resize_y": {"enable_hr": True, "hr_resize_y": 96},
    "hr_checkpoint_name": {"enable_hr": True, "hr_checkpoint_name": "other"},
    "hr_sampler_name": {"enable_hr": True, "hr_sampler_name": "DDIM"},
    "hr_scheduler": {"enable_hr": True, "hr_sampler_name": "Euler", "hr_scheduler": "Karras"},
    "hr_prompt": {"enable_hr": True, "hr_prompt": "a dog"},
    "hr_negative_prompt": {"enable_hr": True, "hr_negative_prompt": "blurry"},
    "script_name": {"script_name": "x/y/z plot"}, "script_args": {"script_args": [1, 2]},
    "save_images": {"save_images": True}, "alwayson_scripts": {"alwayson_scripts": {"ControlNet": {"args": [
        {"enabled": True, "module": "none", "model": "canny", "image": IMAGE}]}}},
    "infotext": {"infotext": "Steps: 20"}, "sd_runtime": {"sd_runtime": {"guidance_rescale": 0.5}},
    "init_images": {"init_images": [png_b64(picture(2))]},
    "resize_mode": {"resize_mode": 1, "init_images": [png_b64(picture(0, (48, 48)))]},
    "image_cfg_scale": {"image_cfg_scale": 1.5}, "mask": {"mask": MASK},
    "mask_blur_x": {"mask": MASK, "mask_blur_x": 8}, "mask_blur_y": {"mask": MASK, "mask_blur_y": 8},
    "mask_blur": {"mask": MASK, "mask_blur": 8}, "mask_round": {"mask": MASK, "mask_round": False},
    "inpainting_fill": {"mask": MASK, "inpainting_fill": 2},
    "inpaint_full_res": {"mask": MASK, "inpaint_full_res": False},
    "inpaint_full_res_padding": {"mask": MASK, "inpaint_full_res_padding": 8},
    "inpainting_mask_invert": {"mask": MASK, "inpainting_mask_invert": 1},
    "initial_noise_multiplier": {"initial_noise_multiplier": 0.9}, "latent_mask": {"latent_mask": MASK},
}
# Implemented fields that shape the answer rather than the generation, with the test that checks them.
RESPONSE_ONLY = {
    "send_images": "tests/test_serve.py (images omitted when false)",
    "include_init_images": "tests/test_serve.py (parameters keep the init images)",
    "force_task_id": "tests/test_serve.py (/progress by task id)",
    "override_settings": "check_override_settings, below",
}
# Fields that act only together: the baseline leaves out both.
PAIRED = {"firstphase_width": ("firstphase_height",), "firstphase_height": ("firstphase_width",)}
# Fields whose probe needs a mask for the baseline too (they act on inpainting only).
NEEDS_MASK = {"mask_blur_x", "mask_blur_y", "mask_blur", "mask_round", "inpainting_fill", "inpaint_full_res",
              "inpaint_full_res_padding", "inpainting_mask_invert"}


def table() -> dict[str, dict[str, str]]:
    """field -> {endpoint: status} from docs/serving.md."""
    text = DOC.read_text()
    body = text.split("<!-- a1111-fields -->")[1].split("<!-- /a1111-fields -->")[0]
    rows: dict[str, dict[str, str]] = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`"):
            continue
        statuses = [s.strip() for s in cells[2].split("/")]
        endpoints = [e.strip() for e in cells[1].split(",")]
        for name in re.findall(r"`([a-z_0-9]+)`", cells[0]):
            assert name not in rows, f"{name} has two rows"
            rows[name] = dict(zip(endpoints, statuses * (len(endpoints) if len(statuses) == 1 else 1)))
    return rows


def test_every_field_has_one_row_with_known_statuses():
    rows = table()
    txt2img = set(a1111.Txt2ImgRequest.model_fields)
    img2img = set(a1111.Img2ImgRequest.model_fields) - txt2img
    assert set(rows) == txt2img | img2img, (set(rows) ^ (txt2img | img2img))
    for name, per in rows.items():
        assert set(per) == ({"txt2img", "img2img"} if name in txt2img else {"img2img"}), (name, per)
        assert set(per.values()) <= set(STATUSES), (name, per)


@pytest.fixture(scope="module")
def styles(tmp_path_factory) -> StyleBook:
    path = tmp_path_factory.mktemp("styles") / "styles.csv"
    path.write_text("name,prompt,negative_prompt\nwarm,\"{prompt}, warm light\",cold\n")
    return StyleBook.load(path)


def _jobs(endpoint: str, fields: dict, styles: StyleBook):
    model = a1111.Txt2ImgRequest if endpoint == "txt2img" else a1111.Img2ImgRequest
    base = BASE if endpoint == "txt2img" else BASE_IMG2IMG
    req = model(**{**base, **fields})
    return a1111.job_settings(req, LIMITS, max_steps=150, max_n_iter=16, styles=styles, controlnets=CONTROLNETS)


def _cases():
    """Every (field, endpoint) of the table, but the implemented fields of RESPONSE_ONLY (their own
    tests check them)."""
    for name, per in table().items():
        for endpoint, status in per.items():
            if not (status == "implemented" and name in RESPONSE_ONLY):
                yield pytest.param(name, endpoint, status, id=f"{endpoint}-{name}-{status}")


@pytest.mark.parametrize("name, endpoint, status", list(_cases()))
def test_each_field_does_what_its_row_says(name, endpoint, status, styles):
    probe = PROBES[name]
    if endpoint == "img2img":  # the hires fix is txt2img's: its fields are probed alone there
        probe = {k: v for k, v in probe.items()
                 if k == name or (k != "enable_hr" and k not in PAIRED.get(name, ()))}
    context = {"mask": MASK} if name in NEEDS_MASK else {}
    if status == "refused":
        with pytest.raises(WireError) as e:
            _jobs(endpoint, {**context, **probe}, styles)
        assert e.value.field.split(".")[0] == name, (name, e.value.field, e.value.message)
        return
    companions = {k: v for k, v in probe.items() if k != name and k not in PAIRED.get(name, ())}
    baseline = _jobs(endpoint, {**context, **companions}, styles)
    probed = _jobs(endpoint, {**context, **probe}, styles)
    if status == "implemented":
        assert probed != baseline, f"{name} is documented as implemented but changes nothing on {endpoint}"
    else:
        assert probed == baseline, f"{name} is documented as no-op but changes the settings on {endpoint}"


def test_override_settings_allow_only_what_changes_nothing():
    a1111.check_override_settings({"enable_pnginfo": False, "CLIP_stop_at_last_layers": 1}, ("tiny",))
    with pytest.raises(WireError, match="override_settings.CLIP_stop_at_last_layers"):
        a1111.check_override_settings({"CLIP_stop_at_last_layers": 2}, ("tiny",))
