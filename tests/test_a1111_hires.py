"""Hires fix and the upscalers that need no weights (runtime/hires.py, runtime/imaging/upscale.py,
runtime/serving/hires_wire.py, runtime/serving/extras.py): the latent interpolation modes against
torch.nn.functional.interpolate, A1111's target-size rule re-derived, and the unchanged `webuiapi`
client's hires fix equal, bit for bit, to the Python API's one two-pass call."""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
from PIL import Image

import runtime
from runtime.hires import HiresFix, hires_steps, target_size
from runtime.imaging import upscale as up
from test_serve_support import LiveServer, as_array, picture, sd1_pipe  # noqa: F401

webuiapi = pytest.importorskip("webuiapi", reason="the dev extra installs webuiapi")

STEPS = 3
A1111_LATENT_MODES = ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                      "Latent (nearest)", "Latent (nearest-exact)"]  # A1111 modules/shared.py, in its order
SIZES = [(4, 4, 8, 8), (16, 16, 32, 32), (64, 64, 128, 128), (13, 17, 29, 31), (40, 50, 80, 100), (30, 30, 12, 17)]


# --- latent modes against torch ------------------------------------------------------------------------

def _exact(name: str, size: tuple[int, int, int, int]) -> bool:
    """Where the NumPy kernel reproduces torch's bits (module doc of runtime/imaging/upscale.py):
    nearest / nearest-exact at every size, antialiased bilinear upscaling, bilinear through torch's
    generic 2-D kernel (output height + width > 128: hires fix of 512 px and up). Elsewhere torch's
    compiled kernels fuse multiply-adds in an order we match only to within float32 rounding."""
    mode, aa = up.LATENT_MODES[name]
    upscaling = size[2] >= size[0] and size[3] >= size[1]
    return mode.startswith("nearest") or (mode == "bilinear" and ((aa and upscaling) or size[2] + size[3] > 128))


@pytest.mark.parametrize("name", A1111_LATENT_MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_latent_modes_equal_torch(name, size):
    torch = pytest.importorskip("torch")
    hi, wi, ho, wo = size
    x = np.random.default_rng(hi * 100 + wo).standard_normal((2, 4, hi, wi), dtype=np.float32)
    before = x.copy()
    mode, aa = up.LATENT_MODES[name]
    want = torch.nn.functional.interpolate(torch.from_numpy(x.copy()), size=(ho, wo), mode=mode, antialias=aa).numpy()
    got = up.interpolate(x, (ho, wo), mode, aa)
    np.testing.assert_array_equal(x, before)  # the caller's array is untouched
    assert got.shape == want.shape and got.dtype == np.float32
    if _exact(name, size):
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=4e-6)


def test_latent_mode_names_are_a1111s():
    assert list(up.LATENT_MODES) == A1111_LATENT_MODES


# --- A1111's target size and step rule, re-derived -----------------------------------------------------

def _a1111_target(width, height, scale, rx, ry):
    """processing.py calculate_target_resolution, written out again: (to_x, to_y, trunc_x, trunc_y)."""
    if rx == 0 and ry == 0:
        return int(width * scale), int(height * scale), 0, 0
    if ry == 0:
        return rx, rx * height // width, 0, 0
    if rx == 0:
        return ry * width // height, ry, 0, 0
    if width / height < rx / ry:
        x, y = rx, rx * height // width
    else:
        x, y = ry * width // height, ry
    return x, y, (x - rx) // 8, (y - ry) // 8


@pytest.mark.parametrize("w, h, scale, rx, ry", [(512, 512, 2, 0, 0), (512, 768, 1.5, 0, 0), (512, 512, 2, 1024, 0),
                                                  (512, 768, 2, 0, 1024), (512, 512, 2, 1024, 768),
                                                  (640, 512, 2, 1024, 1024)])
def test_target_size(w, h, scale, rx, ry):
    to_x, to_y, tx, ty = _a1111_target(w, h, scale, rx, ry)
    assert target_size(h, w, HiresFix(scale=scale, resize_width=rx, resize_height=ry)) == (to_y, to_x, (ty, tx))


@pytest.mark.parametrize("steps, strength", [(3, 0.7), (20, 0.7), (10, 0.5), (30, 0.35), (3, 1.0), (7, 0.999)])
def test_second_pass_runs_hr_steps(steps, strength):
    """sd_samplers_common.setup_img2img_steps: a schedule of int(steps / min(strength, 0.999)) of which
    the last `steps` run; runtime/scheduler.py runs int(n * s) of n."""
    n, s = hires_steps(steps, strength)
    assert n == int(steps / min(strength, 0.999)) and min(int(n * s), n) == steps


# --- the Python API ------------------------------------------------------------------------------------

def test_python_hires(sd1_pipe):
    kw = dict(height=32, width=32, num_inference_steps=STEPS, seed=5, progress=False, scheduler="euler")
    plain = sd1_pipe.txt2img("a red circle", **kw)
    r = sd1_pipe.txt2img("a red circle", hires=HiresFix(scale=2, upscaler="Latent", strength=0.6), **kw)
    assert r.images[0].size == (64, 64) and plain.images[0].size == (32, 32)
    assert r.parameters["hires"] == {"upscaler": "Latent", "steps": STEPS, "strength": 0.6, "height": 64,
                                     "width": 64, "scheduler": "euler", "karras": None, "scale": 2}
    again = sd1_pipe.txt2img("a red circle", hires=dict(scale=2, upscaler="Latent", strength=0.6), **kw)
    np.testing.assert_array_equal(as_array(r.images[0]), as_array(again.images[0]))
    with pytest.raises(runtime.PipelineError) as e:
        sd1_pipe.txt2img("a red circle", hires=HiresFix(scale=8), **kw)
    assert e.value.field == "hires.scale" and "image range" in str(e.value)


# --- HTTP: the unchanged webuiapi client ---------------------------------------------------------------

@pytest.fixture(scope="module")
def sd1(sd1_pipe):
    live = LiveServer(sd1_pipe)
    yield live, webuiapi.WebUIApi(host="127.0.0.1", port=live.port, sampler="Euler a", steps=STEPS)
    live.stop()


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_webuiapi_hires_equals_python(sd1, upscaler):
    live, api = sd1
    r = api.txt2img(prompt="a red circle", negative_prompt="blurry", seed=11, width=32, height=32, cfg_scale=7.0,
                    enable_hr=True, hr_scale=2, hr_upscaler=upscaler)
    assert r.image.size == (64, 64)
    want = live.pipe.txt2img("a red circle", negative_prompt="blurry", seed=11, height=32, width=32,
                             num_inference_steps=STEPS, guidance_scale=7.0, scheduler="euler_a", karras=False,
                             progress=False, hires=HiresFix(scale=2, upscaler=upscaler, strength=0.7))
    np.testing.assert_array_equal(as_array(r.image), as_array(want.images[0]))
    infotext = r.info["infotexts"][0]
    for field in ("Size: 32x32", "Denoising strength: 0.7", "Hires upscale: 2", f"Hires steps: {STEPS}",
                  f"Hires upscaler: {upscaler}"):
        assert field in infotext
    assert r.info["extra_generation_params"]["Hires upscaler"] == upscaler
    assert Image.open(io.BytesIO(_png_bytes(r.image))).size == (64, 64)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_firstphase_maps_to_the_first_pass(sd1):
    """A1111 __post_init__: firstphase_width/height become the first pass's size."""
    live, api = sd1
    r = api.txt2img(prompt="a cat", seed=3, width=128, height=128, firstphase_width=32, firstphase_height=48,
                    enable_hr=True, hr_scale=2, hr_upscaler="Latent (nearest)", cfg_scale=7.0)
    assert r.image.size == (64, 96)
    want = live.pipe.txt2img("a cat", seed=3, height=48, width=32, num_inference_steps=STEPS, guidance_scale=7.0,
                             scheduler="euler_a", karras=False, progress=False,
                             hires=HiresFix(scale=2, upscaler="Latent (nearest)", strength=0.7))
    np.testing.assert_array_equal(as_array(r.image), as_array(want.images[0]))


def test_weighted_upscaler_is_refused(sd1):
    live, _ = sd1
    body = {"prompt": "a cat", "width": 32, "height": 32, "steps": STEPS, "enable_hr": True,
            "hr_upscaler": "R-ESRGAN 4x+"}
    r = requests.post(f"http://127.0.0.1:{live.port}/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("hr_upscaler:") and "R-ESRGAN 4x+" in detail and "Lanczos" in detail


def test_upscaler_endpoints(sd1):
    _, api = sd1
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert api.get_upscalers()[1] == {"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None,
                                      "scale": 4}
    assert [m["name"] for m in api.get_latent_upscale_modes()] == A1111_LATENT_MODES


def test_extra_single_image(sd1):
    live, api = sd1
    image = Image.fromarray(picture(1, (24, 40)))  # 40 wide, 24 high
    same = api.extra_single_image(image)  # webuiapi's defaults: upscaler_1 "None" leaves the image as it is
    np.testing.assert_array_equal(as_array(same.image), np.asarray(image))
    r = api.extra_single_image(image, upscaler_1="Lanczos", upscaling_resize=2, upscaler_2="Nearest",
                               extras_upscaler_2_visibility=0.25)
    # scripts/postprocessing_upscale.py, re-derived: each upscaler resizes by 2 (80x48, already a multiple
    # of 8), then the two are blended at the visibility
    lanczos = image.resize((80, 48), resample=Image.Resampling.LANCZOS)
    nearest = image.resize((80, 48), resample=Image.Resampling.NEAREST)
    np.testing.assert_array_equal(as_array(r.image), np.asarray(Image.blend(lanczos, nearest, 0.25)))
    url = f"http://127.0.0.1:{live.port}/sdapi/v1/extra-single-image"
    bad = requests.post(url, json={"image": "", "upscaler_1": "SwinIR 4x"}, timeout=60)
    assert bad.status_code == 422 and bad.json()["detail"].startswith("upscaler_1:")
    face = requests.post(url, json={"image": "", "gfpgan_visibility": 0.5}, timeout=60)
    assert face.status_code == 422 and face.json()["detail"].startswith("gfpgan_visibility:")
