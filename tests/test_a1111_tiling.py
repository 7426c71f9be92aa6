"""Tiling (seamless textures): A1111's `tiling`, as the folder's circular-padded graphs.

AUTOMATIC1111 v1.10 sets `padding_mode = "circular"` on every `torch.nn.Conv2d` of the model
(modules/sd_hijack.py `apply_circular`, from modules/processing.py `process_images_inner`). The
reference here is built the same way, independently of export/circular.py: a deep copy of the
PyTorch network with that attribute set on each Conv2d. `build-engine --tiling` adds unet_tiled,
vae_decoder_tiled and vae_encoder_tiled (export/circular.py); `tiling=True` runs them.

The seam check: the image rolled by half its width puts its left and right edges side by side in
the middle. With tiling the difference across that wrap-around column pair is no larger than the
neighbouring-column differences elsewhere; without it, it is (zero padding makes the edges their
own). The tiny preset's random weights make noisy images, so the setting is a smooth, periodic
initial latent (a diagonal plane wave, explicit `latents`): its untiled image shows the seam
plainly. The comparison is with the pairs at the same place in the networks' 4-pixel stride pattern
(VAE x2, U-Net x2): pixel pairs inside one latent pixel differ less than pairs across two, and the
wrap-around pair is one across.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from torch import nn

import runtime
from runtime.compare import rel_err
from runtime.errors import PipelineError
from test_serve_support import LiveServer, as_array, picture, pixels, png_b64

STEPS = 4
PERIOD = 4  # pixels of the networks' stride pattern on the tiny preset: VAE x2 times U-Net x2


@pytest.fixture(scope="module")
def tiled_engine(tmp_path_factory):
    from export.build import build_engine

    return build_engine("tiny-sd1", tmp_path_factory.mktemp("tiling") / "tiny-sd1", seed=0, tiling=True,
                        progress=lambda line: None)


@pytest.fixture(scope="module")
def pipe(tiled_engine):
    with runtime.load(tiled_engine, backend="onnxruntime") as p:
        yield p


def plane_wave(seed: int, n: int = 32) -> np.ndarray:
    """A smooth latent [1, 4, n, n] that is periodic along both axes (one diagonal wave per channel)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:n, 0:n] * (2 * np.pi / n)
    amplitude, phase = rng.standard_normal((4, 1, 1)), rng.uniform(0, 2 * np.pi, (4, 1, 1))
    return (np.sqrt(2) * amplitude * np.sin(x + y + phase))[None].astype(np.float32)


def seam(image: np.ndarray, axis: int) -> tuple[float, float]:
    """(difference across the wrap-around pair, mean difference of the other pairs at its place in
    the stride pattern) along `axis` (1: columns, 0: rows) of an HWC image rolled by half its size."""
    rolled = np.roll(image.astype(np.float64), image.shape[axis] // 2, axis=axis)
    other = tuple(a for a in range(3) if a != axis)
    diff = np.abs(np.diff(rolled, axis=axis)).mean(axis=other)  # diff[k]: between k and k + 1
    wrap = image.shape[axis] // 2 - 1
    same_place = [k for k in range(wrap % PERIOD, len(diff), PERIOD) if k != wrap]
    return float(diff[wrap]), float(diff[same_place].mean())


def test_tiled_image_has_no_seam_and_untiled_has_one(pipe):
    settings = dict(latents=plane_wave(1), num_inference_steps=STEPS, output_type="np", progress=False)
    tiled = pipe.txt2img("a seamless texture", tiling=True, **settings).images[0]
    plain = pipe.txt2img("a seamless texture", **settings).images[0]
    for axis in (1, 0):  # rolled by half the width, then by half the height
        wrap, inside = seam(tiled, axis)
        assert wrap <= inside * (1 + 1e-3), f"axis {axis}: tiled wrap-around difference {wrap:.4f} > {inside:.4f}"
        wrap, inside = seam(plain, axis)
        assert wrap > 1.5 * inside, f"axis {axis}: untiled wrap-around difference {wrap:.4f} shows no seam " \
                                    f"(neighbours {inside:.4f})"


def _a1111_circular(module: nn.Module) -> nn.Module:
    """A1111's apply_circular(True) on a deep copy: padding_mode "circular" on every Conv2d."""
    module = copy.deepcopy(module)
    for layer in module.modules():
        if type(layer) is nn.Conv2d:
            layer.padding_mode = "circular"
    return module


@pytest.mark.parametrize("network", ["unet_tiled", "vae_decoder_tiled", "vae_encoder_tiled"])
def test_tiled_graphs_equal_the_pytorch_circular_reference(tiled_engine, network):
    from export.loading.read import random_model
    from export.onnx_export import PARITY_THRESHOLDS, ParityError, check_parity, default_parity_shapes, wrap
    from runtime.folder.manifest import load_manifest

    manifest = load_manifest(tiled_engine)
    model = random_model("tiny-sd1", seed=0)
    base = network.removesuffix("_tiled")
    shapes = default_parity_shapes(model.spec, **{k: manifest.shapes[k] for k in ("min_image", "opt_image",
                                                                                  "max_image", "max_batch")})
    graph = tiled_engine / manifest.networks[network]["file"]
    vocab = model.text_encoder.config.vocab_size
    threshold = PARITY_THRESHOLDS["fp32"]
    result = check_parity(network, _a1111_circular(wrap(base, model)), graph, manifest.dims, "fp32", shapes,
                          vocab_size=vocab, threshold=threshold)
    assert result["rel"] <= threshold
    with pytest.raises(ParityError):  # the check can tell: zero padding is far off
        check_parity(network, wrap(base, model), graph, manifest.dims, "fp32", shapes, vocab_size=vocab,
                     threshold=threshold)


def test_openvino_runs_the_tiled_graphs_as_onnx_runtime_does(tiled_engine, pipe):
    settings = dict(num_inference_steps=STEPS, seed=5, output_type="np", progress=False, tiling=True)
    want = pipe.txt2img("a brick wall", **settings).images
    with runtime.load(tiled_engine, backend="openvino", inference_precision="f32") as ov:
        got = ov.txt2img("a brick wall", **settings).images
    assert rel_err(got, want) <= 1e-3


def test_img2img_runs_the_tiled_encoder(pipe):
    image = picture(1)
    tiled = pipe.img2img("a brick wall", image=image, seed=3, num_inference_steps=STEPS, output_type="np",
                         progress=False, tiling=True)
    assert "vae_encoder_tiled" in pipe.engines and tiled.parameters["tiling"] is True
    plain = pipe.img2img("a brick wall", image=image, seed=3, num_inference_steps=STEPS, output_type="np",
                         progress=False)
    assert "tiling" not in plain.parameters and np.abs(tiled.images - plain.images).max() > 0.05


def test_a_folder_without_the_graphs_refuses_tiling(tiny_sd1_engine, pipe):
    with runtime.load(tiny_sd1_engine, backend="onnxruntime") as plain:
        with pytest.raises(PipelineError, match="build-engine --tiling") as e:
            plain.txt2img("a cat", tiling=True, num_inference_steps=1, progress=False)
        assert e.value.field == "tiling"
        live = LiveServer(plain)
        try:
            r = live.post("/sdapi/v1/txt2img", {"prompt": "a cat", "steps": 1, "tiling": True})
        finally:
            live.stop()
        assert r.status_code == 422 and "tiling" in r.text and "build-engine --tiling" in r.text
    for bad, match in (({"tiling": "yes"}, "True or False"), ({"tiling": True, "vae_tiling": True}, "vae_tiling")):
        with pytest.raises(PipelineError, match=match) as e:
            pipe.txt2img("a cat", num_inference_steps=1, progress=False, **bad)
        assert e.value.field == "tiling"


def test_http_tiling_equals_the_python_api(pipe):
    live = LiveServer(pipe)
    try:
        common = {"prompt": "a brick wall", "steps": STEPS, "seed": 7, "width": 64, "height": 64, "cfg_scale": 7,
                  "sampler_name": "Euler", "tiling": True}
        r = live.post("/sdapi/v1/txt2img", common)
        image = png_b64(picture(2))
        r2 = live.post("/sdapi/v1/img2img", {**common, "init_images": [image], "denoising_strength": 0.6})
    finally:
        live.stop()
    assert r.status_code == 200 and r2.status_code == 200, (r.text, r2.text)
    settings = dict(num_inference_steps=STEPS, seed=7, guidance_scale=7.0, height=64, width=64, scheduler="euler",
                    karras=False, progress=False, tiling=True)
    want = as_array(pipe.txt2img("a brick wall", **settings).images[0])
    np.testing.assert_array_equal(pixels(r.json()["images"][0]), want)
    assert "Tiling: True" in json.loads(r.json()["info"])["infotexts"][0]
    want = as_array(pipe.img2img("a brick wall", image=picture(2), strength=0.6, **settings).images[0])
    np.testing.assert_array_equal(pixels(r2.json()["images"][0]), want)


def test_tiled_graphs_share_the_weights_and_the_build_is_reused(tiled_engine, tiny_sd1_engine):
    from export.build import _reuse_problem, build_engine, tool_versions
    from runtime.folder.manifest import load_manifest

    manifest = load_manifest(tiled_engine)
    for network in ("unet_tiled", "vae_decoder_tiled", "vae_encoder_tiled"):
        entry, base = manifest.networks[network], manifest.networks[network.removesuffix("_tiled")]
        assert entry["external_data"] == base["external_data"] == f"{network.removesuffix('_tiled')}.onnx.data"
    def size(folder):  # the files the manifest vouches for (not the engines' caches)
        return sum(record["size"] for record in load_manifest(folder).files.values())

    graphs = sum(manifest.networks[n]["graph_bytes"] for n in ("unet_tiled", "vae_decoder_tiled",
                                                               "vae_encoder_tiled"))
    # the variants add their graphs (and the shared files' page alignment), not a second copy of the weights
    assert size(tiled_engine) - size(tiny_sd1_engine) <= graphs + 3 * 64 * 4096
    lines = []
    build_engine("tiny-sd1", tiled_engine, seed=0, tiling=True, progress=lines.append)
    assert any("up to date" in line for line in lines)
    problem = _reuse_problem(tiled_engine, manifest.source, manifest.precision, manifest.shapes, tool_versions(),
                             False, None, False)
    assert problem is not None and "tiling" in problem
