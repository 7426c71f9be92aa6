"""The unchanged PyPI client `webuiapi` (AUTOMATIC1111's API client) against our server: txt2img,
img2img and inpainting, on a plain 4-channel U-Net (blend) and on the 9-channel inpainting U-Net;
every image equals what `runtime.load(...)` gives for the same seed and settings."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from PIL import Image, ImageOps

import runtime
from runtime.serving.codec import blur_mask, prepare_mask
from test_serve_support import REQUEST_TIMEOUT_S, LiveServer, as_array, picture, sd1_pipe  # noqa: F401

webuiapi = pytest.importorskip("webuiapi", reason="the dev extra installs webuiapi")

STEPS = 3
SETTINGS = dict(num_inference_steps=STEPS, guidance_scale=7.0, height=64, width=64, progress=False)


def _client(live: LiveServer, sampler: str):
    """webuiapi's client of the live server. It sends without a timeout (its requests.Session has
    none), so its session gets one: a request that hangs fails with requests' ReadTimeout, naming the URL."""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=live.port, sampler=sampler, steps=STEPS)
    api.session.request = functools.partial(api.session.request, timeout=REQUEST_TIMEOUT_S)
    return api


@pytest.fixture(scope="module")
def sd1(sd1_pipe):
    live = LiveServer(sd1_pipe)
    yield live, _client(live, "Euler a")
    live.stop()


@pytest.fixture(scope="module")
def inpaint(tiny_inpaint_engine):
    with runtime.load(tiny_inpaint_engine, backend="onnxruntime") as pipe:
        live = LiveServer(pipe)
        yield live, _client(live, "DDIM")
        live.stop()


def _mask() -> Image.Image:
    m = np.zeros((64, 64), np.uint8)
    m[8:40, 20:60] = 255
    return Image.fromarray(m, mode="L")


def test_webuiapi_txt2img(sd1):
    live, api = sd1
    r = api.txt2img(prompt="a red circle", negative_prompt="blurry", seed=7, width=64, height=64, cfg_scale=7.0,
                    batch_size=2)
    assert r.info["all_seeds"] == [7, 8] and len(r.images) == 2
    assert "Sampler: Euler a" in r.info["infotexts"][0]
    for k, image in enumerate(r.images):
        want = live.pipe.txt2img("a red circle", negative_prompt="blurry", seed=7 + k, scheduler="euler_a",
                                 karras=False, **SETTINGS).images[0]
        np.testing.assert_array_equal(as_array(image), as_array(want), err_msg=f"image {k}")


def test_webuiapi_img2img(sd1):
    live, api = sd1
    init = Image.fromarray(picture(1))
    r = api.img2img(images=[init], prompt="a green square", seed=21, denoising_strength=0.6, width=64, height=64,
                    cfg_scale=7.0, sampler_name="DPM++ 2M", scheduler="Karras")
    want = live.pipe.img2img("a green square", image=init, strength=0.6, seed=21, scheduler="dpmpp_2m", karras=True,
                             **SETTINGS).images[0]
    np.testing.assert_array_equal(as_array(r.image), as_array(want))
    assert r.info["denoising_strength"] == 0.6 and r.info["sampler_name"] == "DPM++ 2M"


@pytest.mark.parametrize("blur, invert", [(0, 0), (4, 0), (0, 1)])
def test_webuiapi_inpaint_plain_unet(sd1, blur, invert):
    live, api = sd1
    init = Image.fromarray(picture(2))
    r = api.img2img(images=[init], mask_image=_mask(), prompt="a yellow star", seed=33, denoising_strength=0.9,
                    width=64, height=64, cfg_scale=7.0, inpainting_fill=1, inpaint_full_res=False, mask_blur=blur,
                    inpainting_mask_invert=invert)
    mask = ImageOps.invert(_mask()) if invert else _mask()
    # A1111's inpainting (runtime/imaging/inpainting.py): blur, latent mask and overlay as A1111 does them
    want = live.pipe.inpaint("a yellow star", image=init, mask_image=mask, strength=0.9, seed=33,
                             scheduler="euler_a", karras=False, masked_content="original", mask_blur=blur,
                             **SETTINGS).images[0]
    np.testing.assert_array_equal(as_array(r.image), as_array(want))
    assert r.info["is_using_inpainting_conditioning"] is False


def test_webuiapi_inpaint_9_channel_unet(inpaint):
    live, api = inpaint
    init = Image.fromarray(picture(3))
    r = api.img2img(images=[init], mask_image=_mask(), prompt="a blue door", seed=5, denoising_strength=1.0,
                    width=64, height=64, cfg_scale=7.0, inpainting_fill=1, inpaint_full_res=False, mask_blur=0)
    # webuiapi sends A1111's `eta` 1.0 by default, which is DDIM's eta there and here
    want = live.pipe.inpaint("a blue door", image=init, mask_image=_mask(), strength=1.0, seed=5, scheduler="ddim",
                             eta=1.0, masked_content="original", **SETTINGS).images[0]
    np.testing.assert_array_equal(as_array(r.image), as_array(want))
    assert r.info["is_using_inpainting_conditioning"] is True
    # our API's rule: the 9-channel U-Net inpaints only (no plain txt2img / img2img)
    with pytest.raises(RuntimeError, match="422.*inpainting U-Net"):
        api.txt2img(prompt="a cat", seed=1, width=64, height=64)


def test_webuiapi_values_we_cannot_serve_are_refused(sd1):
    live, api = sd1
    init = Image.fromarray(picture(2))
    with pytest.raises(RuntimeError, match="422.*inpainting_fill: 4: send 0 \\(fill\\)"):
        api.img2img(images=[init], mask_image=_mask(), prompt="x", seed=1, width=64, height=64, inpainting_fill=4)
    with pytest.raises(RuntimeError, match="422.*mask: mask_image 0 is blank"):
        api.img2img(images=[init], mask_image=Image.new("L", (64, 64)), prompt="x", seed=1, width=64, height=64)


def test_mask_blur_is_a1111s_gaussian():
    """Against SciPy's Gaussian (mirror borders = OpenCV's BORDER_REFLECT_101, truncated at A1111's
    kernel radius int(2.5 sigma + 0.5))."""
    from scipy.ndimage import gaussian_filter1d

    a = np.zeros((40, 70))
    a[10:30, 20:45] = 255
    for sigma in (1, 4, 7.5):
        radius = int(2.5 * sigma + 0.5)
        want = gaussian_filter1d(a, sigma, axis=1, mode="mirror", radius=radius)
        np.testing.assert_allclose(blur_mask(a, sigma, axis=1), want, atol=1e-9)
    mask = prepare_mask(Image.fromarray(a.astype(np.uint8)), invert=True, blur_x=4, blur_y=0)
    m = np.asarray(mask)  # inverted: white outside columns 20..44, blurred across the edges
    assert m[20, 2] == 255 and m[20, 32] == 0 and 0 < m[20, 20] < 255 and m[2, 32] == 255
