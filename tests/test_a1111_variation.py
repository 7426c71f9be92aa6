"""Variation seeds and seed resizing (issue 28; runtime/sampling/variation.py), checked against
AUTOMATIC1111 v1.10's formulas re-derived here: modules/rng.py `slerp` (per column along the height
axis, with its linear fallback for near-parallel noises) and `ImageRNG.first`'s centred paste, and
the seed lists of modules/processing.py `process_images_inner`. The noises are the runtime's
documented draws (runtime/stages.py "Randomness": the first draw of `PCG64(seed)`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from runtime import stages
from runtime.errors import PipelineError
from runtime.imaging import png_info
from runtime.sampling.variation import slerp
from test_serve_support import LiveServer, as_array, pixels, picture, sd1_pipe  # noqa: F401

STEPS = 3
SETTINGS = dict(num_inference_steps=STEPS, guidance_scale=7.0, height=64, width=64, progress=False)


def pcg(seed: int, shape) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(seed)).standard_normal(shape, dtype=np.float32)


def latent_shape(pipe, height=64, width=64):
    s = pipe.vae_scale_factor
    return (pipe.manifest.dims.latent_channels, height // s, width // s)


def initial(pipe, mode="txt2img", prompt="a red circle", **kw) -> np.ndarray:
    r = pipe.request(mode, prompt, **{"num_inference_steps": STEPS, "height": 64, "width": 64, **kw})
    return stages.initial_noise(r, latent_shape(pipe, r.height, r.width), pipe.is_inpainting_unet).noise


def reference_slerp(t: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """A1111's slerp restated: every column v[c, :, w] of the two [C, H, W] noises turns by t of the
    angle between them; if their cosines average above 0.9995, A1111 mixes linearly with low weighted t."""
    a, b = torch.from_numpy(low).double(), torch.from_numpy(high).double()
    cos = torch.einsum("chw,chw->cw", a, b) / (a.norm(dim=1) * b.norm(dim=1))
    if cos.mean().item() > 0.9995:
        return (t * a + (1 - t) * b).float().numpy()
    theta = torch.arccos(cos)
    wa, wb = torch.sin((1 - t) * theta) / torch.sin(theta), torch.sin(t * theta) / torch.sin(theta)
    return (wa[:, None, :] * a + wb[:, None, :] * b).float().numpy()


def reference_paste(small: np.ndarray, full: np.ndarray) -> np.ndarray:
    """A1111's centred paste restated per axis: offset floor((big - small) / 2); a non-negative offset
    places all of `small` there, a negative one crops `small` from -offset, taking small + 2 * offset."""
    out = full.copy()
    (_, hb, wb), (_, hs, ws) = full.shape, small.shape
    oy, ox = (hb - hs) // 2, (wb - ws) // 2
    for y in range(hs + 2 * min(oy, 0)):
        for x in range(ws + 2 * min(ox, 0)):
            out[:, max(oy, 0) + y, max(ox, 0) + x] = small[:, max(-oy, 0) + y, max(-ox, 0) + x]
    return out


# --- the Python API ---------------------------------------------------------------------------------------

def test_strength_0_is_no_variation_bit_for_bit(sd1_pipe):
    plain = sd1_pipe.txt2img("a red circle", seed=5, scheduler="euler_a", **SETTINGS)
    zero = sd1_pipe.txt2img("a red circle", seed=5, subseed=99, subseed_strength=0, scheduler="euler_a", **SETTINGS)
    np.testing.assert_array_equal(as_array(zero.images[0]), as_array(plain.images[0]))
    assert zero.parameters == plain.parameters and "subseeds" not in zero.parameters
    assert sd1_pipe.request("txt2img", "a", seed=5, subseed=9, subseed_strength=0.0).variation is None


def test_strength_1_takes_the_subseeds_initial_noise(sd1_pipe):
    shape = latent_shape(sd1_pipe)
    np.testing.assert_array_equal(initial(sd1_pipe, seed=5, subseed=99, subseed_strength=1.0)[0], pcg(99, shape))
    # a deterministic sampler: nothing else is drawn, so the image is the subseed's own
    one = sd1_pipe.txt2img("a red circle", seed=5, subseed=99, subseed_strength=1.0, scheduler="euler", **SETTINGS)
    alone = sd1_pipe.txt2img("a red circle", seed=99, scheduler="euler", **SETTINGS)
    np.testing.assert_array_equal(as_array(one.images[0]), as_array(alone.images[0]))
    # a stochastic sampler's step noise stays the seed's (A1111's ImageRNG.next): the image is seed 5's run
    # from the subseed's noise, not seed 99's
    anc = sd1_pipe.txt2img("a red circle", seed=5, subseed=99, subseed_strength=1.0, scheduler="euler_a", **SETTINGS)
    given = sd1_pipe.txt2img("a red circle", seed=5, latents=pcg(99, shape)[None], scheduler="euler_a", **SETTINGS)
    other = sd1_pipe.txt2img("a red circle", seed=99, scheduler="euler_a", **SETTINGS)
    np.testing.assert_array_equal(as_array(anc.images[0]), as_array(given.images[0]))
    assert not np.array_equal(as_array(anc.images[0]), as_array(other.images[0]))


def test_strength_1_img2img_keeps_the_seeds_encode_noise(sd1_pipe):
    init = picture(1)
    kw = dict(image=init, strength=0.6, scheduler="euler", **SETTINGS)
    var = sd1_pipe.img2img("a green square", seed=5, subseed=99, subseed_strength=1.0, **kw)
    given = sd1_pipe.img2img("a green square", seed=5, noise=pcg(99, latent_shape(sd1_pipe))[None], **kw)
    np.testing.assert_array_equal(as_array(var.images[0]), as_array(given.images[0]))


@pytest.mark.parametrize("strength", [0.05, 0.3, 0.7])
def test_between_the_noise_is_a1111s_slerp_and_repeats(sd1_pipe, strength):
    shape = latent_shape(sd1_pipe)
    got = initial(sd1_pipe, seed=5, subseed=99, subseed_strength=strength)[0]
    np.testing.assert_allclose(got, reference_slerp(strength, pcg(5, shape), pcg(99, shape)), rtol=1e-5, atol=1e-5)
    kw = dict(seed=5, subseed=99, subseed_strength=strength, scheduler="euler_a", **SETTINGS)
    a, b = (sd1_pipe.txt2img("a red circle", **kw) for _ in range(2))
    np.testing.assert_array_equal(as_array(a.images[0]), as_array(b.images[0]))
    assert a.parameters["subseeds"] == [99] and a.parameters["subseed_strength"] == strength


def test_slerp_of_near_parallel_noises_is_a1111s_linear_mix():
    low = pcg(1, (4, 16, 16))
    high = low + 0.001 * pcg(2, (4, 16, 16))
    np.testing.assert_allclose(slerp(0.3, low, high), 0.3 * low + 0.7 * high, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(slerp(0.3, low, high), reference_slerp(0.3, low, high), rtol=1e-6, atol=1e-6)


def test_one_seed_for_all_images_and_subseed_plus_i(sd1_pipe):
    r = sd1_pipe.txt2img("a red circle", seed=5, subseed=99, subseed_strength=0.4, num_images_per_prompt=2,
                         scheduler="euler_a", **SETTINGS)
    assert r.seeds == [5, 5] and r.parameters["subseeds"] == [99, 100]
    second = sd1_pipe.txt2img("a red circle", seed=5, subseed=100, subseed_strength=0.4, scheduler="euler_a",
                              **SETTINGS)
    np.testing.assert_array_equal(as_array(r.images[1]), as_array(second.images[0]))
    listed = sd1_pipe.request("txt2img", "a", seed=[3, 4], subseed=[7, 1], subseed_strength=0.4,
                              num_images_per_prompt=2)
    assert listed.seeds == (3, 4) and listed.variation.subseeds == (7, 1)


@pytest.mark.parametrize("resize", [(50, 78), (90, 40), (64, 64)])
def test_seed_resize_pastes_centred_as_a1111(sd1_pipe, resize):
    s, (c, lh, lw) = sd1_pipe.vae_scale_factor, latent_shape(sd1_pipe)
    small_shape = (c, resize[0] // s, resize[1] // s)
    got = initial(sd1_pipe, seed=5, num_images_per_prompt=2, seed_resize_from=resize)
    for i, seed in enumerate((5, 6)):  # strength 0: the seeds stay seed + i (A1111)
        want = reference_paste(pcg(seed, small_shape), pcg(seed, (c, lh, lw)))
        np.testing.assert_array_equal(got[i], want)
    mixed = initial(sd1_pipe, seed=5, subseed=99, subseed_strength=0.5, seed_resize_from=resize)[0]
    want = reference_paste(reference_slerp(0.5, pcg(5, small_shape), pcg(99, small_shape)), pcg(5, (c, lh, lw)))
    np.testing.assert_allclose(mixed, want, rtol=1e-5, atol=1e-5)
    if resize == (64, 64):  # its own size: nothing to paste
        np.testing.assert_array_equal(got[0], pcg(5, (c, lh, lw)))


@pytest.mark.parametrize("kw, field", [
    (dict(subseed_strength=1.5), "subseed_strength"), (dict(subseed_strength=float("nan")), "subseed_strength"),
    (dict(subseed_strength=0.5, subseed=-1), "subseed"), (dict(subseed_strength=0.5, subseed=[1, 2]), "subseed"),
    (dict(seed_resize_from=(64,)), "seed_resize_from"), (dict(seed_resize_from=(64, 100000)), "seed_resize_from"),
    (dict(subseed_strength=0.5, noise=np.zeros((1, 4, 32, 32), np.float32)), "subseed_strength"),
])
def test_bad_values_name_their_argument(sd1_pipe, kw, field):
    with pytest.raises(PipelineError) as e:
        sd1_pipe.request("txt2img", "a", seed=1, height=64, width=64, **kw)
    assert e.value.field == field


def test_infotext_writes_a1111s_variation_fields(sd1_pipe):
    r = sd1_pipe.txt2img("a red circle", seed=5, subseed=99, subseed_strength=0.25, seed_resize_from=(50, 78),
                         num_images_per_prompt=2, scheduler="euler", **SETTINGS)
    text = png_info.infotext_from_parameters(r.parameters, seed=5, subseed=100)
    assert "Size: 64x64, Variation seed: 100, Variation seed strength: 0.25, Seed resize from: 78x50, Version" in text
    plain = png_info.infotext_from_parameters(sd1_pipe.txt2img("a", seed=1, **SETTINGS).parameters)
    assert "Variation" not in plain and "Seed resize" not in plain


# --- through the server ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(sd1_pipe):
    live = LiveServer(sd1_pipe)
    yield live
    live.stop()


def _post(server, **body):
    base = dict(prompt="a red circle", steps=STEPS, cfg_scale=7.0, width=64, height=64, sampler_name="Euler a")
    r = server.post("/sdapi/v1/txt2img", {**base, **body})
    assert r.status_code == 200, r.text
    return r.json()["images"], json.loads(r.json()["info"])


def test_http_variation_equals_the_python_api(server, sd1_pipe):
    images, info = _post(server, seed=5, subseed=99, subseed_strength=0.3, batch_size=2, n_iter=2)
    assert info["all_seeds"] == [5, 5, 5, 5] and info["all_subseeds"] == [99, 100, 101, 102]
    assert info["subseed"] == 99 and info["subseed_strength"] == 0.3
    assert "Variation seed: 101, Variation seed strength: 0.3" in info["infotexts"][2]
    for k in range(2):
        want = sd1_pipe.txt2img("a red circle", seed=5, subseed=99 + 2 * k, subseed_strength=0.3,
                                num_images_per_prompt=2, scheduler="euler_a", karras=False, **SETTINGS)
        for j in range(2):
            np.testing.assert_array_equal(pixels(images[2 * k + j]), as_array(want.images[j]), err_msg=f"{k}, {j}")


def test_http_seed_resize_and_strength_0(server, sd1_pipe):
    images, info = _post(server, seed=8, subseed=40, subseed_strength=0, seed_resize_from_h=50, seed_resize_from_w=78)
    assert info["all_seeds"] == [8] and info["all_subseeds"] == [40]  # A1111 reports the subseed it was sent
    assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (78, 50)
    assert "Seed resize from: 78x50" in info["infotexts"][0] and "Variation" not in info["infotexts"][0]
    want = sd1_pipe.txt2img("a red circle", seed=8, seed_resize_from=(50, 78), scheduler="euler_a", karras=False,
                            **SETTINGS)
    np.testing.assert_array_equal(pixels(images[0]), as_array(want.images[0]))
    # one side only: A1111 does not resize; the image is the plain one
    images, _ = _post(server, seed=8, seed_resize_from_h=50, seed_resize_from_w=-1)
    plain = sd1_pipe.txt2img("a red circle", seed=8, scheduler="euler_a", karras=False, **SETTINGS)
    np.testing.assert_array_equal(pixels(images[0]), as_array(plain.images[0]))


def test_http_random_subseed_is_reported(server):
    _, info = _post(server, seed=3, subseed=-1, subseed_strength=0.5, batch_size=2)
    sub = info["subseed"]
    assert sub >= 0 and info["all_subseeds"] == [sub, sub + 1] and info["all_seeds"] == [3, 3]


@pytest.mark.parametrize("body, message", [
    (dict(subseed=-2, subseed_strength=0.5), "subseed: -2"),
    (dict(seed_resize_from_h=100000, seed_resize_from_w=64), "seed_resize_from_h: 100000 is outside"),
])
def test_http_bad_variation_values_are_named(server, body, message):
    r = server.post("/sdapi/v1/txt2img", {"prompt": "a", "steps": STEPS, "width": 64, "height": 64, **body})
    assert r.status_code == 422 and message in r.json()["detail"], r.text


def test_webuiapi_variation_and_its_defaults(server, sd1_pipe):
    webuiapi = pytest.importorskip("webuiapi", reason="the dev extra installs webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=STEPS)
    common = dict(prompt="a red circle", seed=11, width=64, height=64, cfg_scale=7.0)
    r = api.txt2img(subseed=31, subseed_strength=0.6, **common)
    want = sd1_pipe.txt2img("a red circle", seed=11, subseed=31, subseed_strength=0.6, scheduler="euler_a",
                            karras=False, **SETTINGS)
    np.testing.assert_array_equal(as_array(r.image), as_array(want.images[0]))
    assert r.info["all_subseeds"] == [31]
    r = api.txt2img(**common)  # the client's defaults: subseed -1, strength 0, seed_resize_from 0 x 0
    plain = sd1_pipe.txt2img("a red circle", seed=11, scheduler="euler_a", karras=False, **SETTINGS)
    np.testing.assert_array_equal(as_array(r.image), as_array(plain.images[0]))
    assert r.info["all_subseeds"] == [-1] and r.info["subseed_strength"] == 0
