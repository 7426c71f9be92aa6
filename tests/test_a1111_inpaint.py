"""A1111's inpainting (runtime/imaging/inpainting.py): its crop-region, fill and latent-mask functions
against A1111 v1.10's formulas (modules/masking.py, modules/processing.py) re-derived here, and the
unchanged `webuiapi` client with its own defaults (inpainting_fill 0, inpaint_full_res true,
mask_blur 4) for every masked-content mode, whole picture and only masked, on the 4-channel and the
9-channel U-Net: 200, the init image's pixels outside the blurred mask exactly, and the Python API's
image bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

import runtime
from runtime.imaging import inpainting as ip
from runtime.errors import PipelineError
from runtime.serving.codec import blur_mask
from test_serve_support import LiveServer, as_array, picture, sd1_pipe  # noqa: F401

webuiapi = pytest.importorskip("webuiapi", reason="the dev extra installs webuiapi")

STEPS = 3
SETTINGS = dict(num_inference_steps=STEPS, guidance_scale=7.0, height=64, width=64, progress=False)
CONTENT = ("fill", "original", "latent_noise", "latent_nothing")  # A1111 inpainting_fill 0..3


# --- A1111's formulas, re-derived -----------------------------------------------------------------------

def a1111_crop_region(mask: np.ndarray, pad: int):
    """masking.get_crop_region (v1.9): count the blank columns / rows from each side."""
    h, w = mask.shape
    left = next(i for i in range(w) if mask[:, i].any())
    right = next(i for i in range(w) if mask[:, w - 1 - i].any())
    top = next(i for i in range(h) if mask[i].any())
    bottom = next(i for i in range(h) if mask[h - 1 - i].any())
    return max(left - pad, 0), max(top - pad, 0), min(w - right + pad, w), min(h - bottom + pad, h)


def a1111_expand(box, pw, ph, iw, ih):
    """masking.expand_crop_region: the short side grows to the processing ratio (int of the float
    difference), half before and the rest after; a side past the image shifts the box back."""
    x1, y1, x2, y2 = box
    wide = (x2 - x1) / (y2 - y1) > pw / ph
    lo, hi, size = (y1, y2, ih) if wide else (x1, x2, iw)
    want = (x2 - x1) / (pw / ph) if wide else (y2 - y1) * (pw / ph)
    d = int(want - (hi - lo))
    lo, hi = lo - d // 2, hi + (d - d // 2)
    shift = max(hi - size, 0)
    lo, hi = lo - shift, hi - shift
    if lo < 0:
        lo, hi = 0, hi - lo
    hi = min(hi, size)
    return (x1, lo, x2, hi) if wide else (lo, y1, hi, y2)


def a1111_fill(image_u8: np.ndarray, mask_u8: np.ndarray) -> np.ndarray:
    """masking.fill in float: premultiply by alpha 1 - mask, blur (PIL's GaussianBlur, A1111's
    primitive), un-premultiply, composite "over" at radii 256, 64, 16 x2, 4 x4, 2 x2, 0."""
    a = 1.0 - mask_u8.astype(np.float64) / 255.0
    rgb = image_u8.astype(np.float64) / 255.0
    out_rgb, out_a = np.zeros_like(rgb), np.zeros_like(a)
    premult = np.concatenate([rgb * a[..., None], a[..., None]], axis=2)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        chans = [np.asarray(Image.fromarray(np.round(premult[..., c] * 255).astype(np.uint8))
                            .filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64) / 255.0 for c in range(4)]
        ba = chans[3]
        with np.errstate(invalid="ignore", divide="ignore"):
            brgb = np.where(ba[..., None] > 0, np.stack(chans[:3], axis=2) / ba[..., None], 0.0)
        for _ in range(repeats):
            new_a = ba + out_a * (1 - ba)
            with np.errstate(invalid="ignore", divide="ignore"):
                out_rgb = np.where(new_a[..., None] > 0, (brgb * ba[..., None] + out_rgb * (out_a * (1 - ba))[..., None])
                                   / new_a[..., None], 0.0)
            out_a = new_a
    return out_rgb


def test_crop_region_is_a1111s():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(8, 60, size=2)
        m = np.zeros((h, w), np.uint8)
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        m[y0:y0 + rng.integers(1, h), x0:x0 + rng.integers(1, w)] = rng.integers(1, 256)
        pad = int(rng.integers(0, 12))
        assert ip.get_crop_region(m, pad) == a1111_crop_region(m, pad)
        box = ip.get_crop_region(m, pad)
        pw, ph = (int(v) * 8 for v in rng.integers(4, 16, size=2))
        assert ip.expand_crop_region(box, pw, ph, w, h) == a1111_expand(box, pw, ph, w, h)
    assert ip.get_crop_region(np.zeros((8, 8)), 3) is None
    # A1111's docstring example: a 128x32 region processed at 512x512 becomes 128x128
    assert ip.expand_crop_region((100, 200, 228, 232), 512, 512, 512, 512) == (100, 152, 228, 280)


def test_fill_is_a1111s():
    image = picture(4, (48, 64))
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 20:50] = 255
    mask = np.round(blur_mask(mask.astype(np.float64), 3, axis=1)).astype(np.uint8)
    got = ip.fill(image / 255.0, mask / 255.0)
    want = a1111_fill(image, mask)
    assert np.abs(got - want).max() <= 3 / 255  # uint8 rounding of PIL's composites against float
    keep = mask == 0
    np.testing.assert_array_equal(np.round(got[keep] * 255), image[keep])  # the sharp original, last
    inside = got[15:25, 30:40]
    assert np.abs(inside - image[15:25, 30:40] / 255).max() > 0.1  # the square's colour is gone there


def test_latent_mask_is_a1111s():
    """latmask = mask.convert('RGB').resize((lw, lh)) (PIL's default filter), channel 0 / 255, rounded."""
    m = np.zeros((64, 48), np.uint8)
    m[9:37, 5:30] = 200
    m[40:, 40:] = 100
    small = np.asarray(Image.fromarray(m, "L").convert("RGB").resize((6, 8)), dtype=np.float32)[..., 0] / 255
    np.testing.assert_array_equal(ip.latent_mask(m / 255.0, 8, 6, soft=True)[0, 0], small)
    np.testing.assert_array_equal(ip.latent_mask(m / 255.0, 8, 6, soft=False)[0, 0], np.around(small))


def test_resize_and_fill_at_the_same_ratio_is_a_resize():
    a = picture(1, (40, 60)) / 255.0
    got = ip.resize_and_fill(a, 96, 64)
    want = np.stack([np.asarray(Image.fromarray(a[..., c].astype(np.float32)).resize((96, 64), Image.LANCZOS))
                     for c in range(3)], axis=2)
    np.testing.assert_allclose(got, np.clip(want, 0, 1), atol=1e-6)
    wide = ip.resize_and_fill(a, 64, 64)  # 60x40 into 64x64: bands above and below, stretched edge rows
    assert wide.shape == (64, 64, 3) and wide[:10].min() >= 0 and np.abs(wide[0] - wide[5]).max() < 0.05


def test_python_api_arguments_are_validated(sd1_pipe):
    im, m = picture(2), np.zeros((64, 64), np.uint8)
    for kwargs, field in [(dict(masked_content="blur"), "masked_content"), (dict(padding_mask_crop=-1), "padding_mask_crop"),
                          (dict(mask_blur=(1, 2, 3)), "mask_blur"), (dict(soft_mask=None), "soft_mask"),
                          (dict(initial_noise_multiplier=0), "initial_noise_multiplier"),
                          (dict(padding_mask_crop=4), "mask_image")]:
        with pytest.raises(PipelineError) as e:
            sd1_pipe.request("inpaint", "x", image=im, mask_image=m, **kwargs)
        assert e.value.field == field, kwargs
    with pytest.raises(PipelineError, match="inpaint only"):
        sd1_pipe.request("img2img", "x", image=im, masked_content="fill")
    plain = sd1_pipe.request("inpaint", "x", image=im, mask_image=m)
    assert plain.inpainting is None and "masked_content" not in plain.parameters()


# --- through webuiapi, against the Python API -------------------------------------------------------------

@pytest.fixture(scope="module")
def sd1(sd1_pipe):
    live = LiveServer(sd1_pipe)
    yield live, webuiapi.WebUIApi(host="127.0.0.1", port=live.port, sampler="Euler a", steps=STEPS), \
        dict(scheduler="euler_a", karras=False)
    live.stop()


@pytest.fixture(scope="module")
def nine(tiny_inpaint_engine):
    with runtime.load(tiny_inpaint_engine, backend="onnxruntime") as pipe:
        live = LiveServer(pipe)
        # webuiapi sends A1111's eta 1.0, DDIM's eta there and here
        yield live, webuiapi.WebUIApi(host="127.0.0.1", port=live.port, sampler="DDIM", steps=STEPS), \
            dict(scheduler="ddim", eta=1.0)
        live.stop()


def _case(full_res: bool) -> tuple[Image.Image, Image.Image]:
    """Only masked: a 128x96 picture with a small mask (cropped, processed at 64x64, pasted back);
    whole picture: 64x64."""
    h, w = (96, 128) if full_res else (64, 64)
    m = np.zeros((h, w), np.uint8)
    m[30:50, 60:84] = 255 if full_res else 0
    if not full_res:
        m[8:40, 20:60] = 255
    return Image.fromarray(picture(5, (h, w))), Image.fromarray(m, "L")


@pytest.mark.parametrize("unet", ["sd1", "nine"])
@pytest.mark.parametrize("full_res", [True, False])
@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_webuiapi_defaults_inpaint_as_the_python_api(request, unet, full_res, fill):
    live, api, sampler = request.getfixturevalue(unet)
    init, mask = _case(full_res)
    r = api.img2img(images=[init], mask_image=mask, prompt="a blue door", seed=11, width=64, height=64,
                    inpainting_fill=fill, inpaint_full_res=full_res)  # the client's mask_blur 4, strength 0.75
    got = as_array(r.image)
    assert got.shape == as_array(init).shape
    blurred = ip._blurred(np.asarray(mask) / 255.0, (4, 4))
    outside = blurred == 0
    assert outside.sum() > 1000 and (~outside).sum() > 300
    np.testing.assert_array_equal(got[outside], as_array(init)[outside])
    want = live.pipe.inpaint("a blue door", image=init, mask_image=mask, strength=0.75, seed=11,
                             masked_content=CONTENT[fill], padding_mask_crop=0 if full_res else None, mask_blur=4,
                             **sampler, **SETTINGS)
    np.testing.assert_array_equal(got, as_array(want.images[0]))
    assert want.parameters["masked_content"] == CONTENT[fill]
    assert np.abs(got[~outside].astype(int) - as_array(init)[~outside]).max() > 0  # it did repaint


def test_masked_content_modes_differ_and_noise_multiplier_applies(sd1_pipe):
    init, mask = _case(False)
    run = lambda **kw: np.asarray(sd1_pipe.inpaint("a cat", image=init, mask_image=mask, strength=0.75, seed=3,
                                                   mask_blur=4, output_type="np", **kw, **SETTINGS).images[0])
    images = {c: run(masked_content=c) for c in CONTENT}
    for a in CONTENT:
        for b in CONTENT:
            if a < b:
                assert np.abs(images[a] - images[b]).max() > 1e-3, (a, b)
    assert np.abs(run(masked_content="fill", initial_noise_multiplier=0.5) - images["fill"]).max() > 1e-3
    soft = run(masked_content="original", soft_mask=True)
    assert np.abs(soft - images["original"]).max() > 1e-4  # the blurred edge's grey levels reach the latent mask
