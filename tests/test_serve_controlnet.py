"""The unchanged PyPI client `webuiapi` with its `ControlNetUnit` against `python -m runtime serve
FOLDER` on a folder with ControlNets (issue 27): every image equals, bit for bit, the Python API's
for the same settings (the control map computed independently: the image itself for module "none",
OpenCV's Canny for "canny"); the extension's model and module lists and detect answer; bad units
answer 4xx naming the unit and field, and the server keeps serving."""

from __future__ import annotations

import functools
import logging
import subprocess
import sys

import cv2
import numpy as np
import pytest
import requests
from PIL import Image

import runtime
from test_serve_support import REQUEST_TIMEOUT_S, START_TIMEOUT_S, as_array, free_port, png_b64, wait_until

webuiapi = pytest.importorskip("webuiapi", reason="the dev extra installs webuiapi")
diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

log = logging.getLogger(__name__)
STEPS = 3
SIZE = 64
PROMPT = "a lighthouse at dusk"
SETTINGS = dict(num_inference_steps=STEPS, guidance_scale=7.0, height=SIZE, width=SIZE, scheduler="euler",
                karras=False, progress=False)
TINY_EMBEDDING = (16, 32)  # a two-level conditioning embedding for the tiny VAE's x2 downsampling (diffusers' tests)


def _controlnet(unet, seed: int):
    """diffusers' ControlNetModel.from_unet with its zero-initialised output convolutions given random
    weights (else every residual is zero and the control image could not change anything)."""
    torch.manual_seed(seed)
    cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=TINY_EMBEDDING)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
    return cn.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """tiny-sd1 built with two ControlNets, "canny" and "depth"."""
    from export.build import build_engine
    from export.loading.read import random_model
    from export.loading.save import save_diffusers

    root = tmp_path_factory.mktemp("serve-controlnet")
    source = save_diffusers(random_model("tiny-sd1", seed=0), root / "tiny-sd1")
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(source / "unet"))
    for seed, name in ((1, "canny"), (2, "depth")):
        _controlnet(unet, seed).save_pretrained(str(root / name))
    return build_engine(source, root / "engine", controlnets=[f"{root / 'canny'}:canny", f"{root / 'depth'}:depth"],
                        max_batch=2, progress=log.info)


@pytest.fixture(scope="module")
def server(folder):
    """`python -m runtime serve FOLDER` in a child process: (base URL, webuiapi client)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", str(folder), "--port", str(port),
                             "--backend", "onnxruntime", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return requests.get(url + "/health", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_until(lambda: healthy() or proc.poll() is not None, f"the serve command to answer {url}/health",
                   START_TIMEOUT_S + REQUEST_TIMEOUT_S, interval=0.2)
        assert proc.poll() is None, proc.stdout.read()
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=STEPS)
        api.session.request = functools.partial(api.session.request, timeout=REQUEST_TIMEOUT_S)
        yield url, api
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def pipe(folder):
    with runtime.load(folder, backend="onnxruntime") as p:
        yield p


def strokes(seed: int = 0) -> np.ndarray:
    """An edge-map-like picture: white strokes on black, RGB."""
    rng = np.random.default_rng(seed)
    m = np.zeros((SIZE, SIZE), np.uint8)
    for _ in range(5):
        m[rng.integers(0, SIZE), :] = 255
        m[:, rng.integers(0, SIZE)] = 255
    return np.stack([m] * 3, axis=2)


def photo(seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(0, 256, (SIZE // 8, SIZE // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(noise).resize((SIZE, SIZE), Image.BICUBIC))


def txt2img(api, units, seed: int = 3):
    # alwayson_scripts={}: webuiapi 0.9.17 writes the units into its mutable default dict, which
    # every later call of the process (another test's) would then send
    return api.txt2img(prompt=PROMPT, seed=seed, width=SIZE, height=SIZE, cfg_scale=7.0, steps=STEPS,
                       sampler_name="Euler", controlnet_units=units, alwayson_scripts={})


def test_webuiapi_controlnet_txt2img_equals_the_python_api(server, pipe):
    _, api = server
    edges = strokes()
    unit = webuiapi.ControlNetUnit(image=Image.fromarray(edges), module="none", model="canny [0123abcd]", weight=0.8,
                                   resize_mode="Just Resize", guidance_end=0.75, control_mode=0)
    r = txt2img(api, [unit])
    want = pipe.txt2img(PROMPT, seed=3, control_image=edges, controlnet="canny", controlnet_conditioning_scale=0.8,
                        control_guidance_end=0.75, **SETTINGS).images[0]
    assert (as_array(r.image) == as_array(want)).all()
    assert len(r.images) == 2 and (as_array(r.images[1]) == edges).all()  # the detected map after, as the extension
    plain = pipe.txt2img(PROMPT, seed=3, **SETTINGS).images[0]
    assert not (as_array(want) == as_array(plain)).all()  # the ControlNet changed the picture


def test_webuiapi_two_units_canny_and_guess_mode_equal_the_python_api(server, pipe):
    _, api = server
    picture, edges = photo(1), strokes(2)
    units = [webuiapi.ControlNetUnit(image=Image.fromarray(picture), module="canny", model="canny", processor_res=64,
                                     threshold_a=50, threshold_b=150, control_mode=2),
             webuiapi.ControlNetUnit(image=Image.fromarray(edges), module="none", model="DEPTH", weight=0.5,
                                     guidance_start=0.2, control_mode="ControlNet is more important")]
    r = txt2img(api, units, seed=11)
    canny = np.repeat(cv2.Canny(picture, 50, 150)[:, :, None], 3, axis=2)  # short side 64 = processor_res
    want = pipe.txt2img(PROMPT, seed=11, control_image=[canny, edges], controlnet=["canny", "depth"],
                        controlnet_conditioning_scale=[1.0, 0.5], control_guidance_start=[0.0, 0.2],
                        guess_mode=True, **SETTINGS).images[0]
    assert (as_array(r.image) == as_array(want)).all()
    assert len(r.images) == 3 and (as_array(r.images[1]) == canny).all() and (as_array(r.images[2]) == edges).all()


def test_webuiapi_img2img_unit_without_an_image_controls_with_the_init_image(server, pipe):
    _, api = server
    init = Image.fromarray(photo(4))
    unit = webuiapi.ControlNetUnit(module="invert", model="canny", resize_mode="Crop and Resize")
    r = api.img2img(images=[init], prompt=PROMPT, seed=5, width=SIZE, height=SIZE, cfg_scale=7.0, steps=STEPS,
                    sampler_name="Euler", denoising_strength=0.6, controlnet_units=[unit],
                    alwayson_scripts={})
    want = pipe.img2img(PROMPT, image=init, strength=0.6, seed=5, control_image=255 - photo(4), controlnet="canny",
                        **SETTINGS).images[0]
    assert (as_array(r.image) == as_array(want)).all()


def test_the_extensions_lists_version_and_detect(server):
    url, api = server
    assert requests.get(url + "/sdapi/v1/scripts", timeout=REQUEST_TIMEOUT_S).json() == {
        "txt2img": ["controlnet"], "img2img": ["controlnet"]}  # A1111 lists alwayson scripts by lowercased title
    assert api.controlnet_model_list() == ["canny", "depth"]
    assert api.controlnet_module_list() == ["none", "canny", "invert", "threshold", "scribble_xdog"]
    assert api.controlnet_version() == 3
    picture = photo(6)
    out = api.controlnet_detect([Image.fromarray(picture)], module="canny", processor_res=64, threshold_a=40,
                                threshold_b=80)
    assert out.info == "Success" and len(out.images) == 1  # webuiapi decodes the answer's images
    assert (as_array(out.image) == cv2.Canny(picture, 40, 80)[:, :, None]).all()


@pytest.mark.parametrize("unit, field", [
    ({"model": "openpose"}, "model"), ({"module": "depth_midas"}, "module"), ({"image": "bm90IGFuIGltYWdl"}, "image"),
    ({"weight": 2.5}, "weight"), ({"guidance_end": 1.5}, "guidance_end"),
    ({"control_mode": "My prompt is more important"}, "control_mode"),
])
def test_bad_units_answer_422_naming_unit_and_field_and_the_server_keeps_serving(server, unit, field):
    url, _ = server
    good = {"enabled": True, "module": "none", "model": "canny", "image": png_b64(strokes())}
    body = {"prompt": PROMPT, "steps": STEPS, "width": SIZE, "height": SIZE,
            "alwayson_scripts": {"ControlNet": {"args": [good, {**good, **unit}]}}}
    r = requests.post(url + "/sdapi/v1/txt2img", json=body, timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 422, r.text
    assert f"alwayson_scripts.ControlNet.args[1].{field}" in r.json()["detail"]
    assert requests.get(url + "/health", timeout=REQUEST_TIMEOUT_S).json()["status"] == "ok"
    r = requests.post(url + "/controlnet/detect", json={"controlnet_module": "openpose",
                                                       "controlnet_input_images": [png_b64(strokes())]},
                      timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 422 and "controlnet_module" in r.json()["detail"]


def test_webuiapi_only_masked_inpainting_with_a_unit_answers_and_the_unit_acts(server, pipe):
    _, api = server
    init, mask = Image.fromarray(photo(8)), np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 8:40] = 255
    settings = dict(images=[init], mask_image=Image.fromarray(mask), prompt=PROMPT, seed=9, width=SIZE, height=SIZE,
                    cfg_scale=7.0, steps=STEPS, sampler_name="Euler", denoising_strength=0.8)
    unit = webuiapi.ControlNetUnit(image=Image.fromarray(strokes(3)), module="none", model="canny")
    # webuiapi's inpaint_full_res=True: "only masked". Each call gets its own alwayson_scripts: webuiapi's
    # default {} is one shared dict, which a call with units fills for every later call
    controlled = api.img2img(**settings, controlnet_units=[unit], alwayson_scripts={})
    plain = api.img2img(**settings, alwayson_scripts={})
    assert controlled.image.size == (SIZE, SIZE)
    assert not (as_array(controlled.image) == as_array(plain.image)).all()
    outside = np.ones_like(mask, bool)  # beyond the mask blur's reach (radius 10 at webuiapi's mask_blur 4), the
    outside[16 - 12:48 + 12, 0:40 + 12] = False  # original is composited back in both (A1111's overlay)
    assert (as_array(controlled.image)[outside] == as_array(plain.image)[outside]).all()


def test_python_control_resize_modes_are_the_extensions_and_match_the_a1111_path(server, pipe):
    _, api = server
    wide = np.zeros((32, 128, 3), np.uint8)  # red | green | blue bands: the centre of a 2x cover is all green
    wide[:, :32], wide[:, 32:96], wide[:, 96:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    green = np.zeros((SIZE, SIZE, 3), np.uint8)
    green[:] = (0, 255, 0)
    cropped = pipe.txt2img(PROMPT, seed=13, control_image=Image.fromarray(wide), controlnet="canny",
                           control_resize_mode="crop_and_resize", **SETTINGS).images[0]
    want = pipe.txt2img(PROMPT, seed=13, control_image=green, controlnet="canny", **SETTINGS).images[0]
    assert (as_array(cropped) == as_array(want)).all()
    picture = Image.fromarray(photo(14)).resize((96, 48), Image.BICUBIC)
    for mode, name in (("crop_and_resize", "Crop and Resize"), ("resize_and_fill", "Resize and Fill")):
        ours = pipe.txt2img(PROMPT, seed=13, control_image=picture, controlnet="canny", control_resize_mode=mode,
                            **SETTINGS).images[0]
        unit = webuiapi.ControlNetUnit(image=picture, module="none", model="canny", resize_mode=name)
        assert (as_array(txt2img(api, [unit], seed=13).image) == as_array(ours)).all(), mode
