"""The sd-webui-controlnet extension's wire format (runtime/serving/controlnet.py): units under
`alwayson_scripts` become the pipeline's ControlNet keywords, bad units are refused naming the unit
and field; `/controlnet/*` routes on a live server. Control maps are checked against OpenCV and the
unit's own pixels, not against our preprocessing functions."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import webuiapi
from PIL import Image

from runtime.request import Limits
from runtime.serving import a1111, controlnet
from runtime.serving.codec import WireError
from test_serve_support import png_b64

LIMITS = Limits(min_image=32, max_image=128, max_batch=4, vae_scale_factor=2, latent_channels=4,
                default_size=(64, 64), inpainting_unet=False, default_sampler="pndm",
                samplers=("euler", "euler_a", "ddim", "dpmpp_2m", "pndm", "lms", "heun", "unipc", "lcm"))
NETS = ("canny", "Depth_v11")
SIZE = (64, 64)


def smooth(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(noise).resize((w, h), Image.BICUBIC))


IMG = smooth()
B64 = png_b64(IMG)


def unit(**fields) -> dict:
    return {"enabled": True, "module": "none", "model": "canny", "image": B64, **fields}


def kwargs(*units, nets=NETS, size=SIZE, **kw) -> dict:
    return controlnet.unit_kwargs(list(units), nets, size, **kw)


def refused(field: str, *units, match: str | None = None, **kw) -> WireError:
    with pytest.raises(WireError) as e:
        kwargs(*units, **kw)
    assert e.value.field == field, (e.value.field, e.value.message)
    if match:
        assert match in e.value.message, e.value.message
    return e.value


# --- units -> pipeline keywords ----------------------------------------------------------------------------

def test_one_unit_becomes_the_pipelines_keywords():
    out = kwargs(unit(weight=0.5, guidance_start=0.1, guidance_end=0.7))
    assert set(out) == {"control_image", "controlnet", "controlnet_conditioning_scale", "control_guidance_start",
                        "control_guidance_end", "guess_mode"}
    assert out["controlnet"] == ["canny"] and out["controlnet_conditioning_scale"] == [0.5]
    assert out["control_guidance_start"] == [0.1] and out["control_guidance_end"] == [0.7]
    assert out["guess_mode"] is False
    assert len(out["control_image"]) == 1 and (out["control_image"][0] == IMG).all()  # "none" at the request size


def test_several_units_in_order_disabled_ones_skipped_and_none_is_no_keywords():
    other = smooth(seed=1)
    out = kwargs(unit(), unit(enabled=False, model="nothing-served"), unit(model="depth_v11", image=png_b64(other)))
    assert out["controlnet"] == ["canny", "Depth_v11"]
    assert (out["control_image"][1] == other).all()
    assert kwargs() == {} and kwargs(unit(enabled=False)) == {}
    assert kwargs({"module": "canny", "model": "canny", "image": B64}) == {}  # `enabled` defaults to false


def test_model_names_match_with_or_without_the_extensions_hash():
    for name in ("canny", "CANNY", "canny [d14c016b]", "Canny [D14C016B]"):
        assert kwargs(unit(model=name))["controlnet"] == ["canny"]
    assert controlnet.find_model("control_v11p_sd15_canny [d14c016b]", ("control_v11p_sd15_canny",)) \
        == "control_v11p_sd15_canny"
    refused("alwayson_scripts.controlnet.args[0].model", unit(model="canny_v2"), match="served: 'canny', 'Depth_v11'")
    refused("alwayson_scripts.controlnet.args[0].model", unit(model="None"))
    refused("alwayson_scripts.controlnet.args[0].model", unit(), nets=(), match="--controlnet")


def test_canny_unit_is_opencv_canny_at_the_request_size():
    # processor_res 64 = the short side, sides multiples of 64: the extension's resize-with-pad is the identity
    out = kwargs(unit(module="canny", processor_res=64, threshold_a=40, threshold_b=90))
    assert (out["control_image"][0] == cv2.Canny(IMG, 40, 90)[:, :, None]).all()
    # webuiapi's ControlNetUnit defaults: processor_res 512, thresholds 64 / 64, "Resize and Fill"
    wire = webuiapi.ControlNetUnit(image=Image.fromarray(IMG), module="canny", model="canny").to_dict()
    edges = kwargs(wire)["control_image"][0]  # canny at 512, brought back to 64 as a binary map
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert (kwargs(unit(module="canny", processor_res=64, threshold_a=-1, threshold_b=999))["control_image"][0]
            == cv2.Canny(IMG, 100, 200)[:, :, None]).all()  # out of range: the slider's default, as the extension


def test_resize_modes_and_pixel_perfect_reach_the_map():
    wide = np.zeros((32, 128, 3), np.uint8)
    wide[:, :32], wide[:, 32:96], wide[:, 96:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    b64 = png_b64(wide)
    crop = kwargs(unit(image=b64, resize_mode="Crop and Resize"))["control_image"][0]
    assert crop.shape == (64, 64, 3) and (crop == (0, 255, 0)).all()  # the centre of a 2x enlargement: green
    fill = kwargs(unit(image=b64, resize_mode=2))["control_image"][0]
    assert (fill[:24] == 0).all() and (fill[40:] == 0).all() and (fill[24:40, 16:48] == (0, 255, 0)).all()
    just = kwargs(unit(image=b64, resize_mode="Just Resize"))["control_image"][0]
    assert (just[:, :16] == (255, 0, 0)).all() and (just[:, 48:] == (0, 0, 255)).all()
    # pixel perfect: threshold at the resolution where the 32 px short side lands on 64 (crop: k = 2)
    small = smooth(32, 32, seed=4)
    out = kwargs(unit(image=png_b64(small), module="threshold", threshold_a=100, pixel_perfect=True,
                      processor_res=2048))["control_image"][0]
    big = cv2.resize(small, (64, 64), interpolation=cv2.INTER_CUBIC)
    assert (out[:, :, 0] == np.where(big.min(axis=2) > 100, 255, 0)).all()


def test_control_mode_balanced_and_controlnet_is_more_important():
    assert kwargs(unit(control_mode="Balanced"))["guess_mode"] is False
    assert kwargs(unit(control_mode=0))["guess_mode"] is False
    assert kwargs(unit(control_mode="ControlNet is more important"))["guess_mode"] is True
    assert kwargs(unit(control_mode=2), unit(control_mode=2))["guess_mode"] is True
    refused("alwayson_scripts.controlnet.args[0].control_mode", unit(control_mode="My prompt is more important"))
    refused("alwayson_scripts.controlnet.args[0].control_mode", unit(control_mode=1))
    refused("alwayson_scripts.controlnet.args[0].control_mode", unit(control_mode="Loud"))
    refused("alwayson_scripts.controlnet.args[1].control_mode", unit(), unit(control_mode=2), match="same control")


@pytest.mark.parametrize("fields, field", [
    ({"weight": 2.5}, "weight"), ({"weight": -0.1}, "weight"), ({"weight": float("nan")}, "weight"),
    ({"guidance_start": -0.5}, "guidance_start"), ({"guidance_end": 1.5}, "guidance_end"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_start"),
    ({"module": "depth_midas"}, "module"), ({"image": "bm90IGFuIGltYWdl"}, "image"), ({"image": ""}, "image"),
    ({"image": "https://example.com/a.png"}, "image"), ({"resize_mode": "Stretch"}, "resize_mode"),
    ({"resize_mode": 7}, "resize_mode"), ({"weight": "heavy"}, "weight"), ({"colour": "red"}, "colour"),
    ({"advanced_weighting": [1.0] * 13}, "advanced_weighting"), ({"input_mode": "batch"}, "input_mode"),
    ({"animatediff_batch": True}, "animatediff_batch"), ({"effective_region_mask": B64}, "effective_region_mask"),
    ({"mask": png_b64(np.zeros((8, 8), np.uint8)), "image": B64}, "mask"),
    ({"image": png_b64(np.zeros((1, 4096, 3), np.uint8)), "module": "canny"}, "image"),  # a map over the limit
])
def test_bad_units_are_refused_naming_the_unit_and_field(fields, field):
    refused(f"alwayson_scripts.controlnet.args[1].{field}", unit(), unit(**fields))


def test_weight_and_guidance_bounds_are_inclusive():
    out = kwargs(unit(weight=2.0, guidance_start=0.0, guidance_end=1.0), unit(weight=0.0, guidance_start=0.5,
                                                                              guidance_end=0.51))
    assert out["controlnet_conditioning_scale"] == [2.0, 0.0]
    refused("alwayson_scripts.controlnet.args[0].guidance_start", unit(guidance_start=0.5, guidance_end=0.5))


def test_legacy_aliases_and_the_image_forms_clients_send():
    legacy = {"enabled": True, "model": "canny", "input_image": B64, "lowvram": True, "guidance": 0.4}
    out = kwargs(legacy)
    assert (out["control_image"][0] == IMG).all() and out["control_guidance_end"] == [0.4]
    refused("alwayson_scripts.controlnet.args[0].input_image", {**legacy, "image": B64})
    assert (kwargs(unit(image={"image": B64, "mask": None}))["control_image"][0] == IMG).all()
    assert (kwargs(unit(image=f"data:image/png;base64,{B64}"))["control_image"][0] == IMG).all()
    # a mask that is neither blank nor full is the input itself (the extension's canvas scribble)
    scribble = np.zeros((64, 64), np.uint8)
    scribble[30:34, 8:56] = 255
    for form in (unit(mask=png_b64(scribble)), unit(image=[B64, png_b64(scribble)]),
                 unit(mask_image=png_b64(scribble)), unit(image={"image": B64, "mask": png_b64(scribble)})):
        assert (kwargs(form)["control_image"][0] == scribble[:, :, None]).all()
    blank = png_b64(np.zeros((64, 64), np.uint8))
    assert (kwargs(unit(mask=blank))["control_image"][0] == IMG).all()
    # an RGBA image is composited over white (annotator HWC3), grey repeated
    rgba = np.dstack([IMG, np.full((64, 64), 255, np.uint8)])
    rgba[:8, :8, 3] = 0
    got = kwargs(unit(image=png_b64(rgba)))["control_image"][0]
    assert (got[:8, :8] == 255).all() and (got[8:, 8:] == IMG[8:, 8:]).all()


def test_img2img_units_without_an_image_take_the_init_image():
    init = Image.fromarray(smooth(seed=7))
    out = kwargs(unit(image=""), init_image=(init, 0))
    assert (out["control_image"][0] == np.asarray(init)).all()
    refused("alwayson_scripts.controlnet.args[0].image", unit(image=None), match="needs an image")


# --- the A1111 request: alwayson_scripts ---------------------------------------------------------------------

def jobs(endpoint: str = "txt2img", **fields):
    model = a1111.Txt2ImgRequest if endpoint == "txt2img" else a1111.Img2ImgRequest
    base = {"prompt": "a cat", "seed": 5, "steps": 4, "width": 64, "height": 64}
    if endpoint == "img2img":
        base["init_images"] = [png_b64(smooth(seed=2))]
    return a1111.job_settings(model(**{**base, **fields}), LIMITS, max_steps=150, max_n_iter=16, controlnets=NETS)


def test_alwayson_scripts_key_is_matched_case_insensitively_and_every_job_carries_the_units():
    for key in ("controlnet", "ControlNet", "CONTROLNET"):
        mode, settings = jobs(alwayson_scripts={key: {"args": [unit(weight=0.7)]}}, n_iter=2)
        assert mode == "txt2img" and len(settings) == 2
        assert all(s["controlnet"] == ["canny"] and s["controlnet_conditioning_scale"] == [0.7] for s in settings)
    _, plain = jobs(alwayson_scripts={"ControlNet": {"args": []}})
    assert "control_image" not in plain[0]
    with pytest.raises(WireError) as e:
        jobs(alwayson_scripts={"ControlNet": {"args": [unit(weight=3)]}})
    assert e.value.field == "alwayson_scripts.ControlNet.args[0].weight"


def test_other_scripts_and_unsupported_combinations_are_refused():
    cases = [({"alwayson_scripts": {"ADetailer": {"args": []}}}, "txt2img", "alwayson_scripts.ADetailer"),
             ({"alwayson_scripts": {"controlnet": [unit()]}}, "txt2img", "alwayson_scripts.controlnet"),
             ({"alwayson_scripts": {"controlnet": {"args": [unit()]}}, "enable_hr": True}, "txt2img", "enable_hr")]
    for fields, endpoint, field in cases:
        with pytest.raises(WireError) as e:
            jobs(endpoint, **fields)
        assert e.value.field == field, (field, e.value.field)


def test_img2img_unit_without_image_uses_the_init_image_and_inpainting_with_the_whole_picture_works():
    _, settings = jobs("img2img", alwayson_scripts={"controlnet": {"args": [unit(image=None)]}})
    assert (settings[0]["control_image"][0] == smooth(seed=2)).all()
    mask = png_b64(np.full((64, 64), 255, np.uint8))
    mode, settings = jobs("img2img", mask=mask, inpaint_full_res=False,
                          alwayson_scripts={"controlnet": {"args": [unit()]}})
    assert mode == "inpaint" and settings[0]["controlnet"] == ["canny"]


def test_pipeline_errors_on_controlnet_keywords_map_to_the_units_wire_name():
    for name in ("control_image", "controlnet", "controlnet_conditioning_scale", "control_guidance_start",
                 "control_guidance_end", "guess_mode"):
        assert a1111.FIELDS[name] == "alwayson_scripts.controlnet.args"


# --- /controlnet/detect and /controlnet/module_list as functions --------------------------------------------

def test_module_list_has_the_extensions_shape():
    out = controlnet.module_list()
    assert out["module_list"] == ["none", "canny", "invert", "threshold", "scribble_xdog"]
    assert out["module_detail"]["canny"] == {"model_free": False, "sliders": [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}]}
    aliased = controlnet.module_list(alias_names=True)
    assert "invert (from white bg & black line)" in aliased["module_list"]
    assert aliased["module_detail"]["invert (from white bg & black line)"]["sliders"] == []


def test_detect_runs_the_preprocessor():
    from test_serve_support import pixels

    req = controlnet.DetectRequest(controlnet_module="canny", controlnet_input_images=[B64],
                                   controlnet_processor_res=64, controlnet_threshold_a=30, controlnet_threshold_b=60)
    (out,) = controlnet.detect(req)
    assert (pixels(out) == cv2.Canny(IMG, 30, 60)[:, :, None]).all()
    inverted = controlnet.detect(controlnet.DetectRequest(controlnet_module="invert (from white bg & black line)",
                                                          controlnet_images=[B64, B64]))
    assert len(inverted) == 2 and (pixels(inverted[1]) == 255 - IMG).all()
    for body, field in (({"controlnet_module": "openpose", "controlnet_input_images": [B64]}, "controlnet_module"),
                        ({"controlnet_module": "canny"}, "controlnet_input_images"),
                        ({"controlnet_input_images": ["%%%"]}, "controlnet_input_images[0]"),
                        ({"controlnet_module": "canny", "controlnet_input_images": [B64, png_b64(np.zeros(
                            (1, 4096, 3), np.uint8))]}, "controlnet_input_images[1]")):
        with pytest.raises(WireError) as e:
            controlnet.detect(controlnet.DetectRequest(**body))
        assert e.value.field == field


def test_only_masked_inpainting_crops_the_control_input_to_the_inpainted_box():
    # mask box [16, 48) x [16, 48), no blur, no padding: the crop region is that square (the request is
    # square too), enlarged 2x to the request size with Lanczos (A1111's resize, in float here)
    m = np.zeros((64, 64), np.uint8)
    m[16:48, 16:48] = 255
    picture = smooth(seed=9)
    fields = dict(mask=png_b64(m), mask_blur=0, inpaint_full_res=True, inpaint_full_res_padding=0)
    mode, settings = jobs("img2img", **fields, alwayson_scripts={"controlnet": {"args": [
        unit(image=png_b64(picture), resize_mode="Just Resize")]}})
    crop = picture[16:48, 16:48].astype(np.float32) / 255.0
    want = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(crop[:, :, c]), mode="F")
                                .resize((64, 64), Image.Resampling.LANCZOS)) for c in range(3)], axis=2)
    want = np.round(np.clip(want, 0, 1) * 255).astype(np.uint8)
    assert mode == "inpaint" and settings[0]["padding_mask_crop"] == 0
    assert (settings[0]["control_image"][0] == want).all()
    # inpaint_crop_input_image false: the whole picture, as the extension
    _, whole = jobs("img2img", **fields, alwayson_scripts={"controlnet": {"args": [
        unit(image=png_b64(picture), inpaint_crop_input_image=False)]}})
    assert (whole[0]["control_image"][0] == picture).all()


def test_detected_maps_follow_the_enabled_units_that_save_them():
    from test_serve_support import pixels

    other = smooth(seed=5)
    scripts = {"ControlNet": {"args": [unit(), unit(enabled=False), unit(image=png_b64(other)),
                                       unit(save_detected_map=False)]}}
    _, settings = jobs(alwayson_scripts=scripts)
    maps = controlnet.detected_maps(scripts, settings[0])
    assert len(maps) == 2 and (pixels(maps[0]) == IMG).all() and (pixels(maps[1]) == other).all()
    assert controlnet.detected_maps({}, {"prompt": "a cat"}) == []
